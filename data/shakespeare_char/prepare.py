"""
Shakespeare at the character level: train.bin, val.bin (uint16 ids) and meta.json (the vocabulary, and the
end-of-text separator data/prepare.py adds), first 90% train, the rest val.
    python data/shakespeare_char/prepare.py [--input FILE] [--offline]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shakespeare_text import main  # noqa: E402

main(__doc__, os.path.dirname(os.path.abspath(__file__)), 'char')
