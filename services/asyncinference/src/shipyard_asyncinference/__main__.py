"""``python -m shipyard_asyncinference`` runs the service (API, workers, sweeper)."""

from shipyard_asyncinference.main import main

main()
