"""Real 2-rank DeepSpeed runs on CPU (gloo): training, checkpoints, resume, distributed eval."""
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, expected_eval, launch, metrics, ok, run

from model import GPT, GPTConfig
from nanogpt_ds import checkpoints


@pytest.mark.parametrize('stage', [2, 3])
def test_trains_and_checkpoints(saved_run, saved_run_zero3, stage):
    """saved_run is the ZeRO-2 run (10 iterations, an eval and a save every 2); saved_run_zero3 the same under
    ZeRO-3 with gradient checkpointing, which trains the same losses (fp32, to 1e-5)."""
    out, stdout = saved_run if stage == 2 else saved_run_zero3
    assert f'ZeRO-{stage}, float32, 2 rank(s) on cpu (gloo)' in stdout
    assert 'train_batch_size = 8 x 1 x 2 = 16 sequences' in stdout
    records = metrics(out)
    evals = [r for r in records if 'val_loss' in r]
    steps = [r for r in records if 'loss' in r]
    assert [r['iter'] for r in evals] == [0, 2, 4, 6, 8, 10]
    assert [r['iter'] for r in steps] == list(range(10))
    assert set(steps[0]) >= {'iter', 'loss', 'lr', 'dt_ms'}
    assert set(evals[0]) >= {'iter', 'train_loss', 'val_loss'}
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5  # it learns
    assert np.mean([r['loss'] for r in steps[-5:]]) < np.mean([r['loss'] for r in steps[:5]]) - 0.3
    # the logged learning rate follows warmup (2 iters) then cosine, 3e-3 -> 3e-4 by lr_decay_iters, which
    # was not given and so follows max_iters (10), as the start says
    assert 'following the settings given: lr_decay_iters=10 (= max_iters)' in stdout
    assert steps[0]['lr'] == pytest.approx(1e-3) and steps[2]['lr'] == pytest.approx(3e-3)
    assert steps[6]['lr'] == pytest.approx(3e-4 + 0.5 * (3e-3 - 3e-4))  # half way: cos(pi/2)
    # a normal run says nothing a user cannot act on: no library's Python warning (DeepSpeed's deprecated
    # torch.distributed calls are filtered by ds_setup.LIBRARY_WARNINGS)
    assert not re.search(r'^\S+:\d+: \w*Warning: ', stdout, re.M), stdout
    assert '\r' not in stdout  # not a terminal: plain lines, no progress bar (on one: test_observability)
    # checkpoints: latest names the final tag, whose shards are all there: each rank its optimizer states,
    # the model states rank 0 alone (ZeRO-2) or each rank its share (ZeRO-3), and the checksums of them all
    assert checkpoints.latest_tag(str(out)) == 'final'
    assert checkpoints.complete_tags(str(out)) == ['final', 'iter_6', 'iter_8']  # keep_last_n=2
    final = str(out / 'final')
    files_per_rank = [len(checkpoints.files_of_rank(final, r)) for r in (0, 1)]
    assert files_per_rank == ([2, 1] if stage == 2 else [2, 2])
    assert sorted(os.listdir(final)) == sorted(checkpoints.shard_files(final) + [checkpoints.CHECKSUMS])
    state = checkpoints.read_client_state(final)
    assert state['iter_num'] == 10 and state['model_args']['n_layer'] == 2 and len(state['rng_states']) == 2
    assert state['model_args']['vocab_size'] == 85  # from data/shakespeare_char/meta.json, not GPT-2's 50304
    assert state['config']['max_iters'] == 10
    assert state['best_val_loss'] == pytest.approx(evals[-1]['val_loss'])
    if stage == 3:  # the same model as ZeRO-2's
        zero2 = [r['loss'] for r in metrics(saved_run[0]) if 'loss' in r]
        assert [r['loss'] for r in steps] == pytest.approx(zero2, abs=1e-5)


# Stopped and resumed, a run logs the losses of one that never stopped: ZeRO-2 in test_preemption's SIGTERM
# test (with a dataset mix, dropout and accumulation), ZeRO-3 across two hosts in test_several_hosts; from a
# named tag that is not the newest, and a run saved by the layout before nanogpt_ds/, in test_old_runs.


def test_estimate_loss_agrees_across_ranks_and_with_one_process(saved_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(saved_run[0], out)
    proc = ok(launch([*TINY, f'--out_dir={out}', '--init_from=resume', '--eval_only=True']))
    seen = {int(r): (float(t), float(v)) for r, t, v in
            re.findall(r'eval_only: rank (\d) of 2 has train loss ([\d.]+), val loss ([\d.]+)', proc.stdout)}
    assert set(seen) == {0, 1} and seen[0] == seen[1]

    # one process, the same weights, each rank's eval batches
    state = checkpoints.read_client_state(str(out / 'final'))
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['module'])
    expected = expected_eval(model.eval())
    assert seen[0] == pytest.approx((expected['train'], expected['val']), abs=1e-5)
    one_rank = expected_eval(model, ranks=1)
    assert one_rank['val'] != pytest.approx(expected['val'], abs=1e-4)  # the ranks did see different batches


def test_one_process_without_launcher_and_bf16(tmp_path):
    """plain python runs as a world of one; bf16 trains on CPU. DeepSpeed's shared-memory op for inference
    all-reduce is not built: training never calls it."""
    out = tmp_path / 'out'
    proc = ok(run([sys.executable, 'train_deepspeed.py', *TINY, f'--out_dir={out}', '--max_iters=3',
                   '--dtype=bfloat16', '--eval_interval=3']))
    assert 'bfloat16, 1 rank(s) on cpu' in proc.stdout and 'train_batch_size = 8 x 1 x 1' in proc.stdout
    weights = checkpoints.read_client_state(str(out / 'final'))['module']  # what the engine trained in
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert 'shm_comm' not in proc.stdout  # DeepSpeed prints "... shm_comm_op built successfully" when it is
