"""`python -m lowrank_dist.launch ...`: the same command as `python launch/submit.py ...`."""

import sys

from .cli import main

sys.exit(main())
