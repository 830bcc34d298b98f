import sys

from fmkeras.federated.command import main

sys.exit(main())
