"""`python -m fastserve` (and `torchrun -m fastserve train ...`) runs the CLI."""

from fastserve.cli import main

raise SystemExit(main())
