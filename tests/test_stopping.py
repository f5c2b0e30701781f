"""A run stops before max_iters on its own in two cases. A loss that turns NaN or inf (here Adam steps of
1e38) ends it with one error line that names the learning rate and the dtype and says 'final' is untouched:
no checkpoint is written or changed. A val loss that has not improved for early_stop_patience evals in a row
ends it normally: it says so, saves 'final' with the count of evals without gain, and exits 0. Real 2-rank
DeepSpeed runs on CPU (gloo)."""
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TINY, launch, metrics, ok, one_error, snapshot

from nanogpt_ds import checkpoints


@pytest.fixture(scope='module')
def stopping_runs(saved_run, mix, tmp_path_factory):
    """{'nan': (process, out_dir, its files before), 'early': (process, out_dir)}: this file's two launches,
    started at once (each leaves the two cores idle for part of its start-up, two at once much less)."""
    nan_out, early_out = (tmp_path_factory.mktemp(name) / 'out' for name in ('nan', 'early'))
    shutil.copytree(saved_run[0], nan_out)
    before = snapshot(nan_out, ignore_logs=True)
    # Adam steps of 1e38: inf logits
    nan = [*TINY, f'--out_dir={nan_out}', '--init_from=resume', '--max_iters=20', '--eval_interval=2',
           '--always_save_checkpoint=True', '--learning_rate=1e38']
    # a learning rate too small to move the weights: val loss never improves on its first value
    early = [*TINY, f'--dataset={mix}', f'--out_dir={early_out}', '--max_iters=50', '--eval_interval=2',
             '--learning_rate=1e-30', '--warmup_iters=0', '--decay_lr=False', '--early_stop_patience=2']
    with ThreadPoolExecutor(2) as pool:
        nan_run, early_run = pool.submit(launch, nan), pool.submit(launch, early)
        return {'nan': (nan_run.result(), nan_out, before), 'early': (early_run.result(), early_out)}


def test_nan_stops_and_keeps_the_last_checkpoint(stopping_runs):
    proc, out, before = stopping_runs['nan']
    line = one_error(proc)
    assert line.startswith('error: loss is NaN/inf')
    assert re.search(r'lr [\d.]+e\+3[78], float32', line) and 'final is untouched' in line
    assert snapshot(out, ignore_logs=True) == before


def test_early_stop_saves_final(stopping_runs):
    proc, out = stopping_runs['early']
    ok(proc)
    assert 'early stop: val loss has not improved on' in proc.stdout and 'in 2 evals' in proc.stdout
    assert [r['iter'] for r in metrics(out) if 'val_loss' in r] == [0, 2, 4]
    state = checkpoints.read_client_state(str(out / 'final'))
    assert state['iter_num'] == 4 and state['evals_without_gain'] == 2
