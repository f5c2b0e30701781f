"""
Shakespeare in GPT-2 BPE tokens (tiktoken, offline-capable): train.bin and val.bin (uint16 ids).
    python data/shakespeare/prepare.py [--input FILE] [--offline]
No meta.pkl: its absence tells the trainer and sample.py to use GPT-2's BPE and 50257 tokens.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
from shakespeare_text import load_text, parse_args, write_splits  # noqa: E402
from tokenizer import gpt2_encoding  # noqa: E402

args = parse_args(__doc__)
try:
    text, source = load_text(args.input, args.offline)
except ValueError as e:
    from ds_setup import die  # only now: it loads torch
    die(str(e))
print(f'{source}: {len(text):,} characters')
write_splits(gpt2_encoding().encode_ordinary(text), here)
with open(os.path.join(here, 'source.txt'), 'w') as f:
    f.write(source + '\n')
