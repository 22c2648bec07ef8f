"""``python -m axpolicy`` is the same as the ``axpolicy`` command."""

import sys

from axpolicy.cli import main

sys.exit(main())
