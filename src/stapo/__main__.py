import sys

from stapo.cli import main

sys.exit(main())
