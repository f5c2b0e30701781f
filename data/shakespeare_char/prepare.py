"""
Shakespeare at the character level: train.bin, val.bin (uint16 ids) and meta.pkl (the vocabulary, and the
end-of-text separator data/prepare.py adds), first 90% train, the rest val.
    python data/shakespeare_char/prepare.py [--input FILE] [--offline]
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
from shakespeare_text import parse_args, prepare_from_text  # noqa: E402

try:
    prepare_from_text(parse_args(__doc__), here, 'char')
except ValueError as e:
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
    from ds_setup import die  # only now: it loads torch
    die(str(e))
