"""``python -m influx.cli`` (and ``torchrun -m influx.cli``) runs ``influx-score``."""

import sys

from influx.cli import main

sys.exit(main())
