"""`python -m latprof.train ARGS` (and `torchrun --nproc_per_node K -m latprof.train ARGS`)."""

import sys

from latprof.train.cli import main

sys.exit(main())
