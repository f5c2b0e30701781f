"""
Shakespeare in GPT-2 BPE tokens (tiktoken, offline-capable): train.bin and val.bin (uint16 ids), first 90%
train, the rest val.
    python data/shakespeare/prepare.py [--input FILE] [--offline]
No meta.json: its absence tells the trainer and sample.py to use GPT-2's BPE and 50257 tokens.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shakespeare_text import main  # noqa: E402

main(__doc__, os.path.dirname(os.path.abspath(__file__)), 'gpt2')
