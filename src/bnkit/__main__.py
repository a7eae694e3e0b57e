import sys

from bnkit.cli import main

sys.exit(main())
