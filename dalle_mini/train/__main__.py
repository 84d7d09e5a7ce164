"""`python -m dalle_mini.train`: the training pipeline's command line (see `cli.py`)."""

from dalle_mini.train.cli import main

raise SystemExit(main())
