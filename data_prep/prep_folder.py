"""`dalle-ds prep-folder` as a script: `python data_prep/prep_folder.py --help`."""

import sys

from dalle_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep-folder", *sys.argv[1:]]))
