"""`python -m precompile.profiles --write-key-table [README]`: regenerate configs/README.md's key table."""

import sys

from precompile.profiles.catalog import main

sys.exit(main(sys.argv[1:]))
