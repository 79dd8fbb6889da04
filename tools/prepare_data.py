#!/usr/bin/env python
"""Write MDS shards for megafusion: synthetic | images | text. See megafusion/data/prepare.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megafusion.data.prepare_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
