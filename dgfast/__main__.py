"""`python -m dgfast COMMAND ...` (also under `torchrun -m dgfast COMMAND ...`)."""
import sys

from dgfast.cli import main

sys.exit(main())
