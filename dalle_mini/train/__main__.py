"""`python -m dalle_mini.train`: the training pipeline's command line (see `cli.py`)."""

from dalle_mini.train.cli import main

if __name__ == "__main__":  # not again in the stage processes `all` spawns
    raise SystemExit(main())
