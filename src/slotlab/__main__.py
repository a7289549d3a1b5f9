import sys

from slotlab.cli import main

sys.exit(main())
