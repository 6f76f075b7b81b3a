"""``python -m shipyard_imagebuild``."""

from shipyard_imagebuild.main import main

main()
