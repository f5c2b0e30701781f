"""
The training data, checked before a run spends anything on it: train_deepspeed.py's `dataset` is one name
(data/<name>/ or a folder path) or a mix {name: weight}. Each folder holds train.bin and val.bin (uint16
token ids, as nanoGPT's prepare.py scripts write them) and, for a character-level vocabulary, meta.pkl.
"""
import os
import pickle

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def folder(name):
    """The folder of a dataset name: a path as given, a bare name under data/ beside this file."""
    return name if os.sep in name else os.path.join(HERE, 'data', name)


def read_meta(path):
    """The dict in a meta.pkl: 'vocab_size', and for a character vocabulary 'stoi' and 'itos'. None where
    there is no such file: the data is GPT-2 BPE."""
    if not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        return pickle.load(f)


def resolve(dataset, block_size):
    """{name: (folder, weight)} with weights summing to 1, every file checked; ValueError says what to fix."""
    mix = dataset if isinstance(dataset, dict) else {dataset: 1.0}
    if not mix:
        raise ValueError("dataset={} names no data: give a name, or a mix like {'a': 0.7, 'b': 0.3}")
    bad = [f'{k}: {w!r}' for k, w in mix.items()
           if not isinstance(k, str) or isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0]
    if bad:
        raise ValueError(f"dataset mix {dataset!r}: {', '.join(bad)}; each entry is 'name': a weight > 0")
    total = sum(mix.values())
    sources = {}
    for name, weight in mix.items():
        where = folder(name)
        for split in ('train', 'val'):
            check_bin(os.path.join(where, f'{split}.bin'), block_size, how_to_prepare(where))
        sources[name] = (where, weight / total)
    vocabs = {name: vocabulary(where) for name, (where, _) in sources.items()}
    first = next(iter(vocabs))
    for name, vocab in vocabs.items():
        if vocab != vocabs[first]:
            raise ValueError(f'{name} and {first} use different tokenizers ({describe(vocab)} vs '
                             f'{describe(vocabs[first])}): a mix needs one vocabulary; '
                             'prepare them with the same one')
    return sources


def how_to_prepare(where):
    """The command that makes a dataset folder: its own prepare.py (the Shakespeare ones), else
    data/prepare.py."""
    own = os.path.join(where, 'prepare.py')
    if os.path.isfile(own):
        return f'python {own}'
    return f'python data/prepare.py YOUR_FILES --name {where}'


def check_bin(path, block_size, prepare):
    if not os.path.isfile(path):
        raise ValueError(f'{path} not found: run {prepare}')
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f'{path} has {size:,} bytes, an odd number: it is not uint16 token ids; '
                         f'make it again with {prepare}')
    if size // 2 < block_size + 1:
        raise ValueError(f'{path} holds {size // 2:,} tokens, fewer than block_size + 1 = {block_size + 1}: '
                         f'use more text or a smaller --block_size')


def vocabulary(where):
    """The character vocabulary of a folder's meta.pkl, or None for GPT-2 BPE (no meta.pkl)."""
    meta = read_meta(os.path.join(where, 'meta.pkl'))
    if meta is None:
        return None
    return meta.get('stoi') or dict.fromkeys(range(meta['vocab_size']))  # no symbols saved: compare the sizes


def describe(vocab):
    return 'GPT-2 BPE' if vocab is None else f'meta.pkl with {len(vocab)} symbols'


def check_token_ids(sources, vocab_size, chunks=64, chunk_tokens=16384):
    """Every id must be < vocab_size, or the embedding lookup fails deep in a run (or silently on some GPUs):
    first the vocabulary's size (meta.pkl), then up to chunks x chunk_tokens ids spread over each file, not
    the whole file."""
    first_folder = next(iter(sources.values()))[0] if sources else ''
    meta = read_meta(os.path.join(first_folder, 'meta.pkl'))  # a mix shares one vocabulary
    if meta and meta['vocab_size'] > vocab_size:
        names = ', '.join(sources)
        raise ValueError(f"{names} has {meta['vocab_size']} token ids, the model only {vocab_size}")
    for where, _ in sources.values():
        for split in ('train', 'val'):
            path = os.path.join(where, f'{split}.bin')
            data = np.memmap(path, dtype=np.uint16, mode='r')
            starts = np.unique(np.linspace(0, max(0, len(data) - chunk_tokens), chunks).astype(np.int64))
            for start in starts:
                chunk = data[start:start + chunk_tokens]
                if chunk.max() >= vocab_size:
                    at = int(start + np.argmax(chunk >= vocab_size))
                    raise ValueError(f'{path} holds token id {int(data[at])} (at token {at:,}) '
                                     f'but the model has {vocab_size} ids: the data was made with another '
                                     'tokenizer; prepare it again for this model, or train one with a '
                                     'matching vocabulary')
