import sys

from localkube.cli import main

sys.exit(main())
