"""``python -m shipyard_quota``."""

from shipyard_quota.main import main

main()
