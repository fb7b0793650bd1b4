"""`python -m nucleibatch.cli ...` = `nucleibatch ...`."""

import sys

from . import main

sys.exit(main())
