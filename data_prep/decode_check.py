"""`dalle-ds decode-check` as a script: `python data_prep/decode_check.py --help`."""

import sys

from dalle_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["decode-check", *sys.argv[1:]]))
