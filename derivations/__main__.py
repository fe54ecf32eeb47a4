"""``python -m derivations emit --out FILE.json [--cases default]``."""

import sys

from .emit import main

sys.exit(main())
