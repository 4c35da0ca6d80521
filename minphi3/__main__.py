"""`python -m minphi3 ...`: see minphi3/cli.py."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports run: the status main gives it, no traceback
    sys.exit(130)

sys.exit(main())
