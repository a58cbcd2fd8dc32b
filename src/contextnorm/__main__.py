"""``python -m contextnorm``: the ``contextnorm`` command."""

import sys

from contextnorm.cli import main

sys.exit(main())
