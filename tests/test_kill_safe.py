"""Kill -9 safety: a run killed at any moment, during a save included, resumes from the last complete
checkpoint, and `latest` never names a tag whose shards are incomplete.

The real 2-rank launcher is killed (SIGKILL to its whole process group) while a save is under way and just
after one; the resumed runs must log the same losses as a run that was never killed, and a run resumed from
what a kill in the middle of a swap leaves must load the parked <tag>.old and clear the rest. The trainer's
save itself, checkpoints.save() with a real DeepSpeed engine in this process, is also killed before each of
its file operations, for a new tag and for a tag saved a second time."""
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import BIN, INTERRUPTED_ITERS, REPO, env, free_port, launch, metrics, not_in_a_fast_test, ok

from nanogpt_ds import checkpoints, data_sources
from nanogpt_ds.ds_setup import prepare_process

# The killed runs are conftest.interrupted_run's, whose saves last long enough to be caught under way;
# unbroken_run is the same run never killed (test_preemption compares its resumed run with it too).
MAX_ITERS = INTERRUPTED_ITERS  # saves iter_2, iter_4, final


def last_records(out_dir):
    """{iter: record} for the training steps and for the evals; an iter logged twice (trained after the last
    checkpoint, then again after the resume) counts by its last record."""
    steps, evals = {}, {}
    for r in metrics(out_dir):
        (steps if 'loss' in r else evals)[r['iter']] = r
    return steps, evals


def assert_same_losses(reference, out_dir, steps=None, evals=None):
    """out_dir logged the same losses as the reference, on the given iters (default: all the reference's)."""
    ref_steps, ref_evals = last_records(reference)
    got_steps, got_evals = last_records(out_dir)
    assert sorted(got_steps) == sorted(ref_steps if steps is None else steps)
    assert sorted(got_evals) == sorted(ref_evals if evals is None else evals)
    for i, r in got_steps.items():
        assert abs(r['loss'] - ref_steps[i]['loss']) <= 1e-6, (i, r['loss'], ref_steps[i]['loss'])
        assert r['lr'] == ref_steps[i]['lr']
    for i, r in got_evals.items():
        expected = ref_evals[i]['val_loss']
        assert abs(r['val_loss'] - expected) <= 1e-6, (i, r['val_loss'], expected)
        assert abs(r['train_loss'] - ref_evals[i]['train_loss']) <= 1e-6


def assert_complete(tag_dir, iter_num):
    """Each of the 2 ranks' shards is there, matches its checksum and loads, nothing else is, and they hold
    the state at iter_num."""
    assert os.path.isdir(tag_dir), f'{tag_dir} is missing'
    with open(tag_dir / checkpoints.CHECKSUMS) as f:
        recorded = set(json.load(f))
    assert set(os.listdir(tag_dir)) == recorded | {checkpoints.CHECKSUMS}, sorted(os.listdir(tag_dir))
    for rank in (0, 1):
        assert not checkpoints.verify_own_files(str(tag_dir), rank)
        shards = [torch.load(tag_dir / f, map_location='cpu', weights_only=False)
                  for f in checkpoints.files_of_rank(str(tag_dir), rank)]
        optimizer_states = [s['optimizer_state_dict'] for s in shards if 'optimizer_state_dict' in s]
        assert len(optimizer_states) == 1 and optimizer_states[0] is not None  # ZeRO-2: one shard a rank
    client_state = checkpoints.read_client_state(str(tag_dir))
    assert client_state['iter_num'] == iter_num and len(client_state['rng_states']) == 2


def latest_of(out_dir):
    return checkpoints.latest_tag(str(out_dir))


def alive_in_group(pgid):
    """Processes of the group that still run (zombies waiting to be reaped do not count)."""
    alive = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                state, _, group = f.read().rsplit(')', 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state != 'Z':
            alive.append(int(pid))
    return alive


def run_until(args, log_path, moment, timeout=300):
    """Start the launcher in a process group of its own, look at out_dir every ~1 ms, and SIGKILL the whole
    group (launcher and ranks) as soon as moment(out_dir, names in it) holds. Returns once no process of it
    runs."""
    not_in_a_fast_test('launches deepspeed')
    out = next(a.split('=', 1)[1] for a in args if a.startswith('--out_dir='))
    cmd = [os.path.join(BIN, 'deepspeed'), '--num_gpus', '2', '--master_port', str(free_port()),
           'train_deepspeed.py', *args]
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + timeout
    try:
        while True:
            names = os.listdir(out) if os.path.isdir(out) else []
            if names and moment(out, names):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            ended = 'the run ended before the moment to kill it:\n'
            assert proc.poll() is None, ended + open(log_path).read()[-3000:]
            assert time.time() < deadline, 'timed out waiting for the moment to kill'
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        while alive_in_group(proc.pid):
            assert time.time() < deadline + 30, f'still running after SIGKILL: {alive_in_group(proc.pid)}'
            time.sleep(0.01)


def saving_iter_4(out, names):
    """The second save is under way (its .partial exists): the first one, iter_2, is complete."""
    return 'iter_4.partial' in names


def just_saved_iter_4(out, names):
    """iter_4 is in place and named by latest, and no save is under way."""
    try:
        return latest_of(out) == 'iter_4' and not any(n.endswith('.partial') for n in names)
    except FileNotFoundError:
        return False


def mid_swap(reference, out):
    """out as kills leave it: `final` being saved a second time, killed between the renames (final.old and
    final.partial complete, no final, latest = final); and beside iter_8, an iter_8.old that a kill left half
    removed."""
    os.makedirs(out)
    for name in (checkpoints.LATEST, data_sources.VOCABULARY):
        shutil.copy(reference / name, out / name)
    shutil.copytree(reference / 'final', out / 'final.old')
    shutil.copytree(reference / 'final', out / 'final.partial')
    shutil.copytree(reference / 'iter_4', out / 'iter_8')  # stands for an older save of iter_8
    shutil.copytree(reference / 'iter_4', out / 'iter_8.old')
    os.remove(checkpoints.model_states_file(str(out / 'iter_8.old')))
    assert latest_of(out) == 'final' and not (out / 'final').exists()
    return out


def test_killed_during_a_save_just_after_one_or_mid_swap_resumes_from_a_complete_checkpoint(unbroken_run,
                                                                                             tmp_path):
    """Killed while iter_4 is saved, then resumed and killed just after iter_4 is in place, then resumed to
    the end: the run logs what the unbroken one did. And the real 2-rank resume from a kill in the middle of
    a swap (mid_swap): the run resumes from final.old, the last complete checkpoint, and its saves of iter_8
    and final go through and clear the leftovers."""
    reference, args = unbroken_run
    out = tmp_path / 'out'
    # 1. killed while iter_4 is being saved
    run_until([*args, f'--out_dir={out}'], tmp_path / 'run1.log', saving_iter_4)
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith('.partial')] == ['iter_4.partial'], names  # the kill hit the save
    assert 'iter_4' not in names and not [n for n in names if n.endswith('.old')], names
    assert latest_of(out) == 'iter_2'  # the newest complete checkpoint, not the half-written one
    assert_complete(out / 'iter_2', 2)
    assert_same_losses(reference, out, steps=range(4), evals=[0, 2, 4])  # what it logged before the kill
    (out / 'iter_4.partial' / 'junk_of_the_killed_save').write_text('x')

    # 2. resumed from iter_2, killed as soon as its own save of iter_4 is in place
    run_until([*args, f'--out_dir={out}', '--init_from=resume'], tmp_path / 'run2.log', just_saved_iter_4)
    assert f'resumed at iter 2 from {out / "iter_2"}' in (tmp_path / 'run2.log').read_text()
    names = sorted(os.listdir(out))
    # the killed save's remains are gone
    assert not [n for n in names if n.endswith(('.partial', '.old'))], names
    assert latest_of(out) == 'iter_4'
    assert_complete(out / 'iter_4', 4)  # only the shards, not the junk
    steps, _ = last_records(out)
    assert set(range(4)) <= set(steps) <= set(range(5))  # iter 4 may have been logged before the kill
    assert_same_losses(reference, out, steps=sorted(steps), evals=[0, 2, 4])

    # 3. resumed from iter_4, to the end; and at the same time (there is no kill to time: two launches share
    # the cores better than one) the resume from mid_swap's leftovers, up to 4 iters past its final
    swap = mid_swap(reference, tmp_path / 'swap')
    with ThreadPoolExecutor(2) as pool:
        to_the_end = pool.submit(launch, [*args, f'--out_dir={out}', '--init_from=resume'])
        past_the_swap = pool.submit(launch, [*args, f'--out_dir={swap}', '--init_from=resume',
                                             f'--max_iters={MAX_ITERS + 4}'])
        proc, swapped = ok(to_the_end.result()), ok(past_the_swap.result())
    assert f'resumed at iter 4 from {out / "iter_4"}' in proc.stdout
    assert_same_losses(reference, out)  # the iters trained twice count by their last record
    names = sorted(os.listdir(out))
    assert latest_of(out) == 'final'
    assert not [n for n in names if n.endswith(('.partial', '.old', '.tmp'))], names
    for tag, it in (('iter_2', 2), ('iter_4', 4), ('final', MAX_ITERS)):
        assert_complete(out / tag, it)
    weights, expected = (checkpoints.read_client_state(str(o / 'final'))['module'] for o in (out, reference))
    assert weights.keys() == expected.keys()
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6

    assert f'resumed at iter {MAX_ITERS} from {swap / "final.old"}' in swapped.stdout
    names = sorted(os.listdir(swap))
    assert latest_of(swap) == 'final' and not [n for n in names if n.endswith(('.partial', '.old'))], names
    assert_complete(swap / 'iter_8', 8)
    assert_complete(swap / 'final', MAX_ITERS + 4)


# -----------------------------------------------------------------------------
# checkpoints.save(), the trainer's save, with a real DeepSpeed engine (ZeRO-2, a world of one, in this
# process), killed before each of its file operations in turn. A tag saved a second time -- 'final' when a
# finished run is resumed with a larger max_iters, iter_N after a resume from an older tag -- is the case
# where `latest` may already name the tag being replaced.

class Killed(BaseException):
    pass


@pytest.fixture(scope='module')
def engine():
    """A real engine of a tiny model in this process, as a world of one, started as the trainer starts
    (prepare_process: its environment for plain `python train_deepspeed.py`; init_distributed: its process
    group); the process group and the environment go when the module is done."""
    environ = dict(os.environ)
    os.environ['DS_ACCELERATOR'] = 'cpu'
    prepare_process()
    import deepspeed
    import torch.distributed as dist

    from model import GPT, GPTConfig
    from nanogpt_ds.ds_setup import init_distributed, resolve_ds_config
    init_distributed('gloo', False, {})
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    ds_config, _ = resolve_ds_config('ds_config_zero2.json', 1, 1, 1, 1.0, 'float32')
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    yield engine
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def save(engine, out, tag, iter_num):
    """The trainer's save of a state that says iter_num."""
    client_state = {'iter_num': iter_num, 'model_args': {}}
    checkpoints.save(engine, str(out), tag, client_state, np.random.default_rng(0), keep_last_n=2, keep={tag},
                     min_free_disk_mb=0)


def killable(monkeypatch, engine, kill_at=None, half=False):
    """checkpoints.py's file operations (os.replace, remove, rmdir, makedirs, shutil.rmtree, open for writing)
    and the engine's shard writing, counted in ops; with kill_at=k the process 'dies' before op k, or with
    half=True half-way through op k when that is an rmtree (one file removed) or the shard writing (one shard
    written). Returns the list of ops done."""
    ops = []

    def op(name, real):
        def run(*args, **kwargs):
            what = f"{name}({', '.join(os.path.basename(str(a)) for a in args[:2])})"
            if len(ops) == kill_at:
                if half and name == 'rmtree' and os.path.isdir(args[0]) and os.listdir(args[0]):
                    os.remove(os.path.join(args[0], sorted(os.listdir(args[0]))[0]))
                if half and name == 'save_checkpoint':  # one shard written, the others not yet
                    real(*args, **kwargs)
                    partial = os.path.join(args[0], kwargs['tag'])
                    for later_shard in checkpoints.shard_files(partial)[1:]:
                        os.remove(os.path.join(partial, later_shard))
                raise Killed(what)
            ops.append(what)
            return real(*args, **kwargs)
        return run

    class KillableOs:
        path = os.path

        def __getattr__(self, name):
            real = getattr(os, name)
            file_ops = ('replace', 'rename', 'remove', 'unlink', 'rmdir', 'makedirs')
            return op(name, real) if name in file_ops else real

    class KillableShutil:
        def __getattr__(self, name):
            real = getattr(shutil, name)
            return op(name, real) if name in ('rmtree', 'move') else real

    def write_open(path, mode='r', *args, **kwargs):
        return (op('open', open) if set(mode) & set('wax+') else open)(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, 'os', KillableOs())
    monkeypatch.setattr(checkpoints, 'shutil', KillableShutil())
    monkeypatch.setattr(checkpoints, 'open', write_open, raising=False)
    monkeypatch.setattr(engine, 'save_checkpoint', op('save_checkpoint', engine.save_checkpoint))
    return ops


def iter_of(folder):
    """The iter_num of a complete checkpoint (its shards there and matching their checksums); None otherwise.
    """
    folder = str(folder)
    if not os.path.isfile(os.path.join(folder, checkpoints.CHECKSUMS)):
        return None
    if checkpoints.verify_own_files(folder, 0):
        return None
    return checkpoints.read_client_state(folder)['iter_num']


def finished_run(engine, out):
    """out_dir of a run that saved iter_2 and then final at iter 4."""
    save(engine, out, 'iter_2', 2)
    save(engine, out, 'final', 4)


def check_kill_at_each_step(engine, tmp_path, monkeypatch, tag):
    """Kill the save of tag (an iter 6 state) before each of its file operations (and half-way through each
    rmtree and through the shard writing): the resume must then find a complete checkpoint (to_resume: the one
    latest names, or its parked .old), and the next save of the tag by the resumed run (here an iter 2 state
    again: any other state will do) must go through and leave nothing of the killed one behind."""
    probe = tmp_path / 'probe'
    finished_run(engine, probe)
    with monkeypatch.context() as m:
        ops = killable(m, engine)
        save(engine, probe, tag, 6)
    assert iter_of(probe / tag) == 6 and latest_of(probe) == tag
    assert any(op.startswith('save_checkpoint') for op in ops) and any(op.startswith('replace') for op in ops)
    broken = []
    for k in range(len(ops)):
        for half in ([False, True] if ops[k].startswith(('rmtree', 'save_checkpoint')) else [False]):
            out = tmp_path / f'kill_{k}{"_half" if half else ""}'
            finished_run(engine, out)
            where = f'killed {"during" if half else "before"} {ops[k]}'
            with monkeypatch.context() as m:
                killable(m, engine, kill_at=k, half=half)
                with pytest.raises(Killed):
                    save(engine, out, tag, 6)
            folder = checkpoints.to_resume(str(out))['folder']
            if iter_of(out / folder) is None:
                broken.append(f'{where}: the resume would load {folder}, not a complete checkpoint; out_dir '
                              f'has {sorted(os.listdir(out))}')
                continue
            try:
                save(engine, out, tag, 2)
            except OSError as e:
                broken.append(f'{where}: the next save of {tag} fails: {e!r}')
                continue
            left = {n for n in os.listdir(out) if not n.endswith('.py')}  # not DeepSpeed's zero_to_fp32.py
            expected = {'iter_2', 'final', tag, checkpoints.LATEST}
            if latest_of(out) != tag or iter_of(out / tag) != 2 or left != expected:
                broken.append(f'{where}: after the next save, latest = {latest_of(out)}, out_dir has '
                              f'{sorted(os.listdir(out))}')
    assert not broken, '\n'.join(broken)


def test_a_save_of_a_new_tag_killed_at_any_step(engine, tmp_path, monkeypatch):
    check_kill_at_each_step(engine, tmp_path, monkeypatch, 'iter_6')


def test_a_second_save_of_a_tag_killed_at_any_step(engine, tmp_path, monkeypatch):
    check_kill_at_each_step(engine, tmp_path, monkeypatch, 'final')
