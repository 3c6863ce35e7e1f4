import sys

from ssl_lab.cli import main

sys.exit(main())
