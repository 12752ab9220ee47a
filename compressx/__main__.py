"""``python -m compressx`` is the ``compressx`` command."""

import sys

from compressx.cli import main

sys.exit(main())
