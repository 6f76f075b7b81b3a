"""``python -m shipyard_platform --home H --run-id ID``: the supervisor process ``up`` starts."""

import sys

from shipyard_platform.supervisor import main

sys.exit(main())
