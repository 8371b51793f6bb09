import sys

from sftops.cli import main

sys.exit(main())
