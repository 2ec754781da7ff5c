import sys

from p2t.cli import main

sys.exit(main())
