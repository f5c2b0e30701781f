"""
Shakespeare in GPT-2 BPE tokens (tiktoken, offline-capable): train.bin and val.bin (uint16 ids), first 90%
train, the rest val.
    python data/shakespeare/prepare.py [--input FILE] [--offline]
No meta.json: its absence tells the trainer and sample.py to use GPT-2's BPE and 50257 tokens.
"""
import os
import runpy

HERE = os.path.dirname(os.path.abspath(__file__))
# data/shakespeare_text.py, which both Shakespeare scripts share, run by its path: no import path to set
main = runpy.run_path(os.path.join(HERE, '..', 'shakespeare_text.py'))['main']
main(__doc__, HERE, 'gpt2')
