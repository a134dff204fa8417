import sys

from specssm.cli import main

if __name__ == "__main__":      # worker processes (drift, TP) re-import this module
    sys.exit(main())
