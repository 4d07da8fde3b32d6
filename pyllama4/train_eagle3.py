"""`python -m pyllama4.train_eagle3 ...`: trains an EAGLE3 draft for a pyllama4 target.

The command-line entry point, above every other layer: it only hands over to
pyllama4.speculative.train.
"""

from pyllama4.speculative.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
