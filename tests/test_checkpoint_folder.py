"""The checkpoint folder (out_dir) never holds a save that cannot be resumed from, and never loses the last
good one. Saves rotate: the newest keep_last_n iter_* tags stay, with the best-val tag and 'final', and
nothing half-written is left behind. A run whose first save would not fit on the disk (with min_free_disk_mb
to spare) stops before training, in one error line. A damaged shard, even one torch.load would read
without complaint, is found before loading and named in one error line with the tags to resume from
instead. (A kill between parking the old 'final' and renaming the new save into place: test_kill_safe.)
Each test works on one finished real 2-rank DeepSpeed run on CPU (gloo), the saved_run fixture, or a copy
of it."""
import os
import shutil

import pytest
from conftest import TINY, launch, metrics, one_error, snapshot

from nanogpt_ds import checkpoints


def test_rotation_keeps_the_newest_the_best_and_final(saved_run, tmp_path):
    out, stdout = saved_run
    # val improved at every eval: iter_8 is best
    assert checkpoints.complete_tags(out) == ['final', 'iter_6', 'iter_8']
    assert 'saved checkpoint' in stdout and '(removed iter_2)' in stdout and '(removed iter_4)' in stdout
    # no file or folder with a dot (iter_9.partial, final.old) but the logs, the vocabulary and DeepSpeed's
    # zero_to_fp32.py
    logs = ('metrics.jsonl', 'run.json', 'meta.json')
    dotted = [p for p in os.listdir(out) if '.' in p and p not in logs and not p.endswith('.py')]
    assert not dotted

    # the policy itself: the newest n by iter number, plus the ones to keep; other names untouched
    for tag in ('iter_2', 'iter_4', 'iter_10', 'iter_12', 'final', 'iter_9.partial'):
        shutil.copytree(out / 'final', tmp_path / tag, copy_function=os.link)  # real shards, hard-linked
    assert checkpoints.rotate(tmp_path, 2, keep={'iter_2'}) == ['iter_4']
    assert sorted(os.listdir(tmp_path)) == ['final', 'iter_10', 'iter_12', 'iter_2', 'iter_9.partial']


def test_full_disk_stops_before_training(saved_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(saved_run[0], out)
    before = snapshot(out, ignore_logs=True)
    proc = launch([*TINY, f'--out_dir={out}', '--init_from=resume', '--max_iters=14', '--eval_interval=2',
                   '--always_save_checkpoint=True', f'--min_free_disk_mb={2**40}'])
    line = one_error(proc)
    assert f'error: {out} has' in line
    assert 'free, a checkpoint needs about 1.7 MiB plus min_free_disk_mb=' in line
    assert 'stopped before training' in line
    assert snapshot(out, ignore_logs=True) == before
    trained = [r['iter'] for r in metrics(out) if 'loss' in r]
    assert trained[-1] == 9  # nothing more: the run it resumed from ended at iter 9


def test_a_save_without_room_suggests_resuming_only_from_something(saved_run, tmp_path):
    """The same check at a save (the disk filled up during the run): resume when there is a checkpoint, else
    start again."""
    fresh = checkpoints.disk_shortfall(str(tmp_path / 'new'), 10**6, 'float32', 2**40)
    assert 'stopped before writing it' in fresh and 'nothing was saved to resume from' in fresh
    assert '--init_from=resume' not in fresh
    assert '--init_from=resume' in checkpoints.disk_shortfall(str(saved_run[0]), 10**6, 'float32', 2**40)


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_damaged_shard_is_one_line(saved_run, tmp_path, damage):
    out = tmp_path / 'out'
    shutil.copytree(saved_run[0], out)
    shard = out / 'final' / checkpoints.files_of_rank(str(out / 'final'), 1)[0]  # rank 1's optimizer states
    data = bytearray(shard.read_bytes())
    if damage == 'flip':
        data[len(data) // 2] ^= 0xFF  # torch.load would read this without complaint
    shard.write_bytes(data if damage == 'flip' else data[:len(data) // 2])
    before = snapshot(out, ignore_logs=True)
    line = one_error(launch([*TINY, f'--out_dir={out}', '--init_from=resume', '--max_iters=12']))
    assert f'error: {shard}' in line and 'resume from another tag with --resume_tag (iter_6, iter_8)' in line
    assert snapshot(out, ignore_logs=True) == before
