"""``python -m hesse.cli``: the ``hesse`` command."""

import sys

from . import main

sys.exit(main())
