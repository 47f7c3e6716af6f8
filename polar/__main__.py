import sys

from polar.cli import main

sys.exit(main())
