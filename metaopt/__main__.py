"""``python -m metaopt …`` runs the ``metaopt`` command line (see :mod:`metaopt.cli`)."""

import sys

from metaopt.cli import main

sys.exit(main())
