"""``python -m prime_plugin.cli`` runs the ``prime`` command."""

import sys

from prime_plugin.cli import main

sys.exit(main())
