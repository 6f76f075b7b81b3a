"""``python -m shipyard_logging`` runs the service until SIGTERM."""

from shipyard_logging.main import main

main()
