"""``python -m fastdeploy_patch``: the same as the ``fastdeploy-patch`` command."""

import sys

from fastdeploy_patch.cli import main

if __name__ == "__main__":
    sys.exit(main())
