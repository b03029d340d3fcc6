"""python -m stages.cli: the ocibuild command line."""

import sys

from stages.cli import main

sys.exit(main())
