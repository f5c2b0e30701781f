"""
Shakespeare in GPT-2 BPE tokens (tiktoken, offline-capable): train.bin and val.bin (uint16 ids), first 90%
train, the rest val.
    python data/shakespeare/prepare.py [--input FILE] [--offline]
No meta.pkl: its absence tells the trainer and sample.py to use GPT-2's BPE and 50257 tokens.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
from shakespeare_text import parse_args, prepare_from_text  # noqa: E402

try:
    prepare_from_text(parse_args(__doc__), here, 'gpt2')
except ValueError as e:
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
    from ds_setup import die  # only now: it loads torch
    die(str(e))
