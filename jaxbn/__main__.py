"""``python -m jaxbn``: the command line (see :mod:`jaxbn.cli`)."""

import sys

from jaxbn.cli import main

sys.exit(main())
