"""
Shakespeare at the character level: train.bin, val.bin (uint16 ids) and meta.pkl (the vocabulary).
    python data/shakespeare_char/prepare.py [--input FILE] [--offline]
"""
import os
import pickle
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
from shakespeare_text import load_text, parse_args, write_splits  # noqa: E402

args = parse_args(__doc__)
try:
    text, source = load_text(args.input, args.offline)
except ValueError as e:
    from ds_setup import die  # only now: it loads torch
    die(str(e))
print(f'{source}: {len(text):,} characters')
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
print(f'vocabulary: {len(chars)} characters')
write_splits([stoi[c] for c in text], here)
with open(os.path.join(here, 'meta.pkl'), 'wb') as f:
    pickle.dump({'vocab_size': len(chars), 'itos': itos, 'stoi': stoi, 'source': source}, f)
