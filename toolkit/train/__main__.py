"""`python -m toolkit.train RECIPE [key=value ...]`, the entry point for `accelerate launch -m toolkit.train`."""

import sys

from toolkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
