"""``python -m shipyard_scheduler`` runs the service;
``python -m shipyard_scheduler stop-local-instances`` stops every model server the local
backend started under this installation (``shipyard down`` runs it)."""

import sys

from shipyard_scheduler.main import main, stop_local_instances

if sys.argv[1:] == ["stop-local-instances"]:
    stop_local_instances()
else:
    main()
