import sys

from fmkeras.compress.command import main

sys.exit(main())
