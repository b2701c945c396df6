"""`dalle-ds train-tokenizer` as a script: `python data_prep/train_tokenizer.py --help`."""

import sys

from dalle_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-tokenizer", *sys.argv[1:]]))
