"""``python -m shipyard_gateway``."""

from shipyard_gateway.main import main

main()
