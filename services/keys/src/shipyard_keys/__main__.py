"""``python -m shipyard_keys [serve | bootstrap-admin --name NAME]``."""

from shipyard_keys.main import main

main()
