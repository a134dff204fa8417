import sys

from specssm.cli import main

sys.exit(main())
