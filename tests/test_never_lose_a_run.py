"""Pre-emption, rotation, the disk check, NaN guards, early stopping, dataset mixes and damaged checkpoints,
each on real 2-rank DeepSpeed runs on CPU (gloo)."""
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

import checkpoints
import data_sources
from conftest import BIN, REPO, TINY, env, free_port, launch, metrics, ok, one_error, run, script_function
from conftest import snapshot

CHAR = os.path.join(REPO, 'data', 'shakespeare_char')


def last_losses(out_dir):
    """iter -> loss, the last record of each iter winning (a killed run logs some iters twice)."""
    return {r['iter']: r['loss'] for r in metrics(out_dir) if 'loss' in r}


def start(args, ranks=2):
    cmd = [os.path.join(BIN, 'deepspeed'), '--num_gpus', str(ranks), '--master_port', str(free_port()),
           'train_deepspeed.py', *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def ranks_of(proc):
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if '--local_rank=' in ' '.join(p.cmdline())]


def wait_for_iters(out_dir, n, proc, timeout=180, key='loss'):
    """Until metrics.jsonl has n records with key ('loss': training iters, 'val_loss': evals)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(out_dir / 'metrics.jsonl') and sum(key in r for r in metrics(out_dir)) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f'no {n} iters in {out_dir}')


@pytest.fixture(scope='module')
def mix(tmp_path_factory):
    """A second dataset with the character vocabulary: Shakespeare's characters backwards."""
    folder = tmp_path_factory.mktemp('backwards')
    for split in ('train', 'val'):
        np.fromfile(os.path.join(CHAR, f'{split}.bin'), dtype=np.uint16)[::-1].tofile(folder / f'{split}.bin')
    shutil.copy(os.path.join(CHAR, 'meta.pkl'), folder)
    return {'shakespeare_char': 3, str(folder): 1}


def test_preempted_mix_resumes_exactly(tmp_path, mix):
    """SIGTERM to the ranks: each finishes its step, they save together, exit 0; resumed, the run logs the losses of
    one that never stopped (dataset mix, dropout, gradient accumulation: every random stream is restored)."""
    args = [*TINY, f'--dataset={mix}', '--dropout=0.1', '--gradient_accumulation_steps=12', '--max_iters=24',
            '--eval_interval=8', '--lr_decay_iters=24']
    ok(launch([*args, f'--out_dir={tmp_path / "a"}']))
    out = tmp_path / 'b'
    proc = start([*args, f'--out_dir={out}'])
    wait_for_iters(out, 4, proc)
    for rank in ranks_of(proc):
        rank.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, stdout[-3000:]
    said = [line for line in stdout.splitlines() if line.startswith('SIGTERM: stopped after iter')]
    assert len(said) == 1, stdout[-3000:]
    stopped = int(said[0].split('iter ')[1].split()[0]) + 1
    assert 4 <= stopped < 24 and (out / 'latest').read_text() == f'iter_{stopped}'
    assert not (out / 'final').exists()

    ok(launch([*args, f'--out_dir={out}', '--init_from=resume']))
    a, b = last_losses(tmp_path / 'a'), last_losses(out)
    assert sorted(b) == list(range(24))
    assert max(abs(a[i] - b[i]) for i in range(24)) <= 1e-6
    evals = [r for r in metrics(out) if 'val_loss' in r]
    names = [k for k in evals[-1] if k.startswith('val_loss_')]
    assert len(names) == 2  # each dataset's val loss, and val_loss their 3:1 weighted mean
    assert evals[-1]['val_loss'] == pytest.approx(0.75 * evals[-1]['val_loss_shakespeare_char'] +
                                                  0.25 * evals[-1][next(n for n in names if 'char' not in n)])


def test_run_script_ctrl_c_saves_and_exits_0(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.Popen([os.path.join(REPO, 'run_deepspeed_xl.sh'), '--cpu-demo', '--master_port', str(free_port()),
                             f'--out_dir={out}', '--max_iters=100000', '--log_interval=1', '--dtype=float32'],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_iters(out, 3, proc)
    proc.send_signal(signal.SIGINT)  # to the script alone, as a terminal's Ctrl-C reaches its foreground job
    stdout = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, stdout[-3000:]
    tag = (out / 'latest').read_text()
    assert f'SIGTERM: stopped after iter {int(tag[5:]) - 1} and saved {out / tag}' in stdout
    assert f'checkpoints: {out} ({tag} is the newest' in stdout


def test_sigterm_to_the_deepspeed_command_saves(tmp_path):
    """kill -TERM <pid of the deepspeed command>, as a container's PID 1 or a batch system gets it:
    DeepSpeed's runner dies of it (143) and tells no rank; the ranks see it gone, finish the step, save and
    exit 0."""
    out = tmp_path / 'out'
    proc = start([*TINY, f'--out_dir={out}', '--max_iters=100000', '--eval_interval=100000'])
    wait_for_iters(out, 3, proc)
    below = psutil.Process(proc.pid).children(recursive=True)  # launch.py and the ranks
    proc.send_signal(signal.SIGTERM)  # to the runner alone
    stdout = proc.communicate(timeout=120)[0]  # the ranks hold its stdout until they exit
    assert proc.returncode == -signal.SIGTERM, stdout[-3000:]
    said = [line for line in stdout.splitlines() if 'stopped after iter' in line]
    assert len(said) == 1, stdout[-3000:]
    assert said[0].startswith('the end of the deepspeed command: stopped after iter')
    tag = (out / 'latest').read_text()
    assert said[0].endswith(f'saved {out / tag}; go on with --init_from=resume')
    assert checkpoints.complete_tags(out) == [tag]
    _, alive = psutil.wait_procs(below, timeout=20)
    assert not alive


def test_second_signal_exits_at_once(tmp_path):
    """The first step takes 5000 micro batches (half a minute or more): the first SIGTERM, sent once the eval at
    iter 0 is logged, waits for it; a second one 3 s later ends the run at once, saving nothing."""
    out = tmp_path / 'out'
    proc = start([*TINY, f'--out_dir={out}', '--gradient_accumulation_steps=5000', '--max_iters=2'])
    wait_for_iters(out, 1, proc, key='val_loss')
    ranks = ranks_of(proc)
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    time.sleep(3)
    t = time.time()
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and time.time() - t < 20, stdout[-3000:]
    assert 'stopped after iter' not in stdout and not (out / 'latest').exists()


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
    """A finished run that saved at every eval, keeping the newest two iter_* tags."""
    out = tmp_path_factory.mktemp('run') / 'out'
    proc = ok(launch([*TINY, f'--out_dir={out}', '--max_iters=10', '--eval_interval=2', '--always_save_checkpoint=True']))
    return out, proc.stdout


def test_rotation_keeps_the_newest_the_best_and_final(saved_run, tmp_path):
    out, stdout = saved_run
    assert checkpoints.complete_tags(out) == ['final', 'iter_6', 'iter_8']  # val improved at every eval: iter_8 is best
    assert 'saved checkpoint' in stdout and '(removed iter_2)' in stdout and '(removed iter_4)' in stdout
    assert not [p for p in os.listdir(out) if '.' in p and p not in ('metrics.jsonl', 'run.json', 'meta.pkl')
                and not p.endswith('.py')]

    # the policy itself: the newest n by iter number, plus the ones to keep; other names untouched
    for tag in ('iter_2', 'iter_4', 'iter_10', 'iter_12', 'final', 'iter_9.partial'):  # real shards, hard-linked
        shutil.copytree(out / 'final', tmp_path / tag, copy_function=os.link)
    assert checkpoints.rotate(tmp_path, 2, keep={'iter_2'}) == ['iter_4']
    assert sorted(os.listdir(tmp_path)) == ['final', 'iter_10', 'iter_12', 'iter_2', 'iter_9.partial']


def test_nan_stops_and_keeps_the_last_checkpoint(saved_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(saved_run[0], out)
    before = snapshot(out, ignore_logs=True)
    proc = launch([*TINY, f'--out_dir={out}', '--init_from=resume', '--max_iters=20', '--eval_interval=2',
                   '--always_save_checkpoint=True', '--learning_rate=1e38'])  # Adam steps of 1e38: inf logits
    line = one_error(proc)
    assert line.startswith('error: loss is NaN/inf') and re.search(r'lr [\d.]+e\+3[78], float32', line) and 'final is untouched' in line
    assert snapshot(out, ignore_logs=True) == before


def test_full_disk_stops_before_writing(saved_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(saved_run[0], out)
    before = snapshot(out, ignore_logs=True)
    proc = launch([*TINY, f'--out_dir={out}', '--init_from=resume', '--max_iters=14', '--eval_interval=2',
                   '--always_save_checkpoint=True', f'--min_free_disk_mb={2**40}'])
    line = one_error(proc)
    assert f'error: {out} has' in line and 'free, a checkpoint needs about 1.7 MiB plus min_free_disk_mb=' in line
    assert 'stopped before writing it' in line and '--init_from=resume' in line
    assert snapshot(out, ignore_logs=True) == before
    assert [r['iter'] for r in metrics(out) if 'loss' in r][-1] == 11  # it trained up to the save, then stopped


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_damaged_shard_is_one_line(saved_run, tmp_path, damage):
    out = tmp_path / 'out'
    shutil.copytree(saved_run[0], out)
    shard = out / 'final' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'
    data = bytearray(shard.read_bytes())
    if damage == 'flip':
        data[len(data) // 2] ^= 0xFF  # torch.load would read this without complaint
    shard.write_bytes(data if damage == 'flip' else data[:len(data) // 2])
    before = snapshot(out, ignore_logs=True)
    line = one_error(launch([*TINY, f'--out_dir={out}', '--init_from=resume', '--max_iters=12']))
    assert f'error: {shard}' in line and 'resume from another tag with --resume_tag (iter_6, iter_8)' in line
    assert snapshot(out, ignore_logs=True) == before


def test_interrupted_swap_resumes_from_the_parked_folder(saved_run, tmp_path):
    """A kill between parking the old 'final' as final.old and renaming the new save into place."""
    out = tmp_path / 'out'
    shutil.copytree(saved_run[0], out)
    os.rename(out / 'final', out / 'final.old')
    os.rename(out / 'iter_8', out / 'final.partial')
    assert checkpoints.tag_to_resume(out) == ('final', 'final.old')
    proc = ok(launch([*TINY, f'--out_dir={out}', '--init_from=resume', '--max_iters=12', '--eval_interval=2']))
    assert f'resumed at iter 10 from {out / "final.old"}' in proc.stdout
    assert checkpoints.complete_tags(out) == ['final', 'iter_6']  # the stale .partial was cleared by the next save


def test_early_stop_saves_final(tmp_path, mix):
    out = tmp_path / 'out'
    proc = ok(launch([*TINY, f'--dataset={mix}', f'--out_dir={out}', '--max_iters=50', '--eval_interval=2',
                      '--learning_rate=1e-30', '--warmup_iters=0', '--decay_lr=False', '--early_stop_patience=2']))
    assert 'early stop: val loss has not improved on' in proc.stdout and 'in 2 evals' in proc.stdout
    assert [r['iter'] for r in metrics(out) if 'val_loss' in r] == [0, 2, 4]
    state = torch.load(out / 'final' / 'mp_rank_00_model_states.pt', map_location='cpu', weights_only=False)
    assert state['iter_num'] == 4 and state['evals_without_gain'] == 2


def test_mix_draws_by_weight_and_needs_one_vocabulary(tmp_path, mix):
    sources = data_sources.resolve(mix, 32)
    assert [w for _, w in sources.values()] == [0.75, 0.25]
    get_batch = script_function('get_batch', np=np, torch=torch, os=os, sources=sources, source_names=list(sources),
                                source_weights=[0.75, 0.25], block_size=32, batch_size=1, on_gpu=False)
    rng = np.random.default_rng(0)
    share = np.mean([not _in_forward(get_batch('train', rng)[0][0].numpy()) for _ in range(400)])
    assert 0.18 < share < 0.32  # 1 in 4 windows from the backwards text

    other = tmp_path / 'other'
    other.mkdir()
    for split in ('train', 'val'):
        shutil.copy(os.path.join(CHAR, f'{split}.bin'), other)
    meta = pickle.load(open(os.path.join(CHAR, 'meta.pkl'), 'rb'))
    meta['stoi'] = {k: (v + 1) % meta['vocab_size'] for k, v in meta['stoi'].items()}
    pickle.dump(meta, open(other / 'meta.pkl', 'wb'))
    with pytest.raises(ValueError, match='use different tokenizers'):
        data_sources.resolve({'shakespeare_char': 1, str(other): 1}, 32)
    os.remove(other / 'meta.pkl')  # no meta.pkl: GPT-2 BPE
    with pytest.raises(ValueError, match=r'meta.pkl with 84 symbols vs GPT-2 BPE'):
        data_sources.resolve({str(other): 1, 'shakespeare_char': 1}, 32)


_FORWARD = None


def _in_forward(window):
    """Whether the window is a slice of the forward text (the backwards text's windows almost never are)."""
    global _FORWARD
    if _FORWARD is None:
        _FORWARD = np.fromfile(os.path.join(CHAR, 'train.bin'), dtype=np.uint16).tobytes()
    return window.astype(np.uint16).tobytes() in _FORWARD


@pytest.mark.parametrize('case', ['short', 'odd', 'ids', 'unwritable'])
def test_bad_data_and_out_dir_are_one_line(tmp_path, case):
    data = tmp_path / 'data'
    data.mkdir()
    ids = np.fromfile(os.path.join(CHAR, 'val.bin'), dtype=np.uint16)
    for split in ('train', 'val'):
        ids.tofile(data / f'{split}.bin')
    shutil.copy(os.path.join(CHAR, 'meta.pkl'), data)
    out = tmp_path / 'out'
    if case == 'short':
        ids[:20].tofile(data / 'val.bin')
    elif case == 'odd':
        with open(data / 'train.bin', 'ab') as f:
            f.write(b'\0')
    elif case == 'ids':
        bad = ids.copy()
        bad[1000] = 500
        bad.tofile(data / 'train.bin')
    else:
        (tmp_path / 'a_file').write_text('')
        out = tmp_path / 'a_file' / 'out'
    args = [*TINY, f'--dataset={data}', f'--out_dir={out}', '--max_iters=2']
    line = one_error(run([sys.executable, 'train_deepspeed.py', *args]))
    expected = {'short': f'{data}/val.bin holds 20 tokens, fewer than block_size + 1 = 33',
                'odd': f'{data}/train.bin has {2 * len(ids) + 1:,} bytes, an odd number',
                'ids': f'{data}/train.bin holds token id 500 (at token 1,000) but the model has 84 ids',
                'unwritable': f'out_dir={out} cannot be written ({tmp_path / "a_file"} is not a writable folder)'}[case]
    assert expected in line
    assert not out.exists() or case == 'unwritable'
