"""A dataset mix, --dataset={name or folder: weight, ...}: data_sources.resolve turns the weights into shares
that sum to 1, and the trainer's get_batch draws each training window from a dataset with the probability of
its share. The datasets must speak one vocabulary: a mix of a character-level dataset with another whose
vocabulary maps the characters differently, or with one that has none (GPT-2 BPE), is refused with a
ValueError that says the tokenizers differ. The mix itself is the mix fixture (conftest.py): Shakespeare's
characters 3:1 with the same characters backwards."""
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, script_function

from nanogpt_ds import data_sources

CHAR = os.path.join(REPO, 'data', 'shakespeare_char')


def test_mix_draws_by_weight_and_needs_one_vocabulary(tmp_path, mix):
    sources = data_sources.resolve(mix, 32)
    assert [w for _, w in sources.values()] == [0.75, 0.25]
    get_batch = script_function('get_batch', np=np, torch=torch, os=os, sources=sources,
                                source_names=list(sources), source_weights=[0.75, 0.25], block_size=32,
                                batch_size=1, on_gpu=False)
    rng = np.random.default_rng(0)
    windows = np.stack([get_batch('train', rng)[0][0].numpy() for _ in range(400)])
    forward = forward_windows()
    hashes = window_hashes(windows)
    in_forward = forward[np.searchsorted(forward, hashes).clip(max=len(forward) - 1)] == hashes
    share = np.mean(~in_forward)
    assert 0.18 < share < 0.32  # 1 in 4 windows from the backwards text

    other = tmp_path / 'other'
    other.mkdir()
    for split in ('train', 'val'):
        shutil.copy(os.path.join(CHAR, f'{split}.bin'), other)
    meta = data_sources.read_meta(data_sources.vocabulary_file(CHAR))
    shifted = {(i + 1) % meta['vocab_size']: c for i, c in meta['itos'].items()}  # the same symbols, new ids
    data_sources.write_meta(other, dict(meta, itos=shifted, stoi={c: i for i, c in shifted.items()},
                                        separator=(meta['separator'] + 1) % meta['vocab_size']))
    with pytest.raises(ValueError, match='use different tokenizers'):
        data_sources.resolve({'shakespeare_char': 1, str(other): 1}, 32)
    os.remove(other / data_sources.VOCABULARY)  # no vocabulary: GPT-2 BPE
    with pytest.raises(ValueError, match=r'a vocabulary of 85 symbols vs GPT-2 BPE'):
        data_sources.resolve({str(other): 1, 'shakespeare_char': 1}, 32)


def window_hashes(windows):
    """A hash of each window (the rows of a 2-d array of ids): a polynomial in its ids, in uint64 arithmetic
    that wraps (mod 2**64), so that two different windows share one by chance, about 1 in 2**64."""
    hashes = np.zeros(len(windows), dtype=np.uint64)
    for column in windows.astype(np.uint64).T:
        hashes = hashes * np.uint64(1_000_003) + column
    return hashes


def forward_windows(block_size=32):
    """The hash of every window of the forward text, as window_hashes gives it (the same polynomial, over
    shifted copies of the text: no 2-d array of every window), sorted: a window drawn from the forward text
    is among them, one of the backwards text almost never is."""
    ids = np.fromfile(os.path.join(CHAR, 'train.bin'), dtype=np.uint16).astype(np.uint64)
    count = len(ids) - block_size + 1
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(block_size):
        hashes = hashes * np.uint64(1_000_003) + ids[offset:offset + count]
    return np.sort(hashes)
