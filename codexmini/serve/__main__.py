"""`python -m codexmini.serve MODEL.cmx ...` (the same as `codexmini serve`)."""

import sys

from .cli import main

sys.exit(main())
