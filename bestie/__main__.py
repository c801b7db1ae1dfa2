"""``python -m bestie`` (and ``torchrun -m bestie``): the command line of :mod:`bestie.cli`."""

import sys

from bestie.cli import main

sys.exit(main())
