"""get_batch and get_lr as written in train_deepspeed.py: the flat script's own function definitions,
taken from its source and run against a namespace holding the constants they read."""
import math
import os

import numpy as np
import pytest
from conftest import one_source, script_function


def test_get_batch(tmp_path):
    import torch
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / 'train.bin')
    get_batch = script_function('get_batch', np=np, torch=torch, os=os, block_size=16, batch_size=5,
                                on_gpu=False, **one_source(str(tmp_path)))
    x, y = get_batch('train', np.random.default_rng([1, 0]))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 15, dtype=torch.int64))  # contiguous windows
    assert int(y.max()) <= 999
    x2, _ = get_batch('train', np.random.default_rng([1, 0]))
    x3, _ = get_batch('train', np.random.default_rng([1, 1]))
    assert torch.equal(x, x2) and not torch.equal(x, x3)  # seeded, and each rank draws its own


def test_lr_schedule():
    get_lr = script_function('get_lr', math=math, learning_rate=1.0, min_lr=0.1, warmup_iters=4,
                             lr_decay_iters=14, decay_lr=True)
    assert [get_lr(i) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warmup
    assert get_lr(4) == pytest.approx(1.0)
    assert get_lr(9) == pytest.approx(0.55)  # half way down the cosine
    assert get_lr(14) == get_lr(100) == pytest.approx(0.1)
    assert all(get_lr(i) > get_lr(i + 1) for i in range(4, 14))
    const = script_function('get_lr', math=math, learning_rate=1.0, min_lr=0.1, warmup_iters=0,
                            lr_decay_iters=14, decay_lr=False)
    assert [const(i) for i in (0, 7, 50)] == [1.0, 1.0, 1.0]
