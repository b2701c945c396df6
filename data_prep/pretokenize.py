"""`dalle-ds pretokenize` as a script: `python data_prep/pretokenize.py --help`."""

import sys

from dalle_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretokenize", *sys.argv[1:]]))
