"""python -m worker: the tokenheap command line."""

from worker.cli import main

raise SystemExit(main())
