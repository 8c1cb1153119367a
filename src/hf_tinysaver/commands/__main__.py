"""`python -m hf_tinysaver.commands`: the `tinysaver` command line (also under `accelerate launch -m`)."""

import sys

from . import main

sys.exit(main())
