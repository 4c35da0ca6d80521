"""`python -m minphi3 ...`: see minphi3/cli.py."""

import sys

from .cli import main

sys.exit(main())
