"""``python -m lotus`` (used by ``torchrun -m lotus train ...``)."""

import sys

from lotus.cli import main

sys.exit(main())
