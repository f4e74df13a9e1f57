import sys

from drsync.cli import main

sys.exit(main())
