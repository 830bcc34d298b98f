import sys

from fmkeras.explain.command import main

sys.exit(main())
