"""``python -m scatlas.cli``: the ``scatlas`` command."""

import sys

from . import main

sys.exit(main())
