"""Pre-emption: a SIGTERM (a batch system's or a container's notice) or a Ctrl-C never loses a run. Whether it
reaches the ranks themselves, the deepspeed command alone (whose runner dies of it and tells no rank), or
run_deepspeed_xl.sh, every rank finishes the step it is in, they save one checkpoint together, say so in one
line naming the tag and how to go on, and exit 0 (the runner that died of the signal excepted); no process is
left behind. Resumed, the run logs exactly the losses of one that never stopped. A second signal while the
first waits for a long step ends the run at once, saving nothing. Real 2-rank DeepSpeed runs on CPU (gloo);
the second signal, which each rank's handler settles alone, in a world of one."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import (BIN, INTERRUPTED_ITERS, REPO, TINY, by_iter, env, free_port, launch, metrics,
                      not_in_a_fast_test, ok)

from nanogpt_ds import checkpoints, preemption


def start(args, ranks=2):
    """deepspeed --num_gpus <ranks> train_deepspeed.py <args>, not waited for, in a session of its own."""
    not_in_a_fast_test('launches deepspeed')
    deepspeed = os.path.join(BIN, 'deepspeed')
    port = str(free_port())
    cmd = [deepspeed, '--num_gpus', str(ranks), '--master_port', port, 'train_deepspeed.py', *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc, timeout=120):
    """The stdout of a started launch once it has exited. Past timeout, each rank prints its threads' stacks
    (SIGUSR1, ds_setup.prepare_process) before the session is killed: the failure shows where it hung."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for rank in ranks_of(proc) or [proc]:  # a world of one is its own rank
            rank.send_signal(signal.SIGUSR1)
        time.sleep(3)
        below = psutil.Process(proc.pid).children(recursive=True)
        tree = '\n'.join(f'{p.pid} {p.status()} {" ".join(p.cmdline())[:150]}' for p in below)
        for p in [proc, *below]:  # run_deepspeed_xl.sh starts the launch in a session of its own
            p.kill()
        stdout = proc.communicate()[0]
        stacks = '\n'.join(line for line in stdout.splitlines()
                           if line.startswith(('Thread 0x', 'Current thread', '  File ')))
        said = f'still running after {timeout} s:\n{tree}\n{stacks}\n{stdout[-3000:]}'
        raise AssertionError(said) from None


def ranks_of(proc):
    """The rank processes under a started launch: the ones given --local_rank=."""
    below = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in below if '--local_rank=' in ' '.join(p.cmdline())]


def wait_for_iters(out_dir, n, proc, timeout=180, key='loss'):
    """Until metrics.jsonl has n records with key ('loss': training iters, 'val_loss': evals)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(out_dir / 'metrics.jsonl') and sum(key in r for r in metrics(out_dir)) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f'no {n} iters in {out_dir}')


def as_a_terminal_starts_it():
    """SIGINT at its default, as in a terminal's foreground job. A background job of a non-interactive shell
    (`nohup ... &`, some CI runners) starts with SIGINT ignored, passes that on to everything it starts, and
    bash cannot trap a signal it started with ignored: run so, the script never sees the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.launches
def test_ctrl_c_to_the_run_script_reaches_the_ranks_as_sigterm_and_the_resumed_run_is_exact(tmp_path,
                                                                                            unbroken_run):
    """Ctrl-C to run_deepspeed_xl.sh, which sends its ranks alone a SIGTERM: each finishes its step, they save
    together, exit 0, and the script names the newest checkpoint; resumed, the run logs the losses of one that
    never stopped (unbroken_run: a dataset mix, dropout, gradient accumulation: every random stream is
    restored)."""
    reference, args = unbroken_run
    out = tmp_path / 'out'
    script = os.path.join(REPO, 'run_deepspeed_xl.sh')
    # the demo's config under args that set every one of its settings, but beta2, back to unbroken_run's
    cmd = [script, '--cpu-demo', '--master_port', str(free_port()), *args, '--beta2=0.95', f'--out_dir={out}']
    not_in_a_fast_test('launches deepspeed')
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=as_a_terminal_starts_it)
    wait_for_iters(out, 1, proc)
    proc.send_signal(signal.SIGINT)  # to the script alone, as a terminal's Ctrl-C reaches its foreground job
    stdout = finish(proc)
    assert proc.returncode == 0, stdout[-3000:]
    said = [line for line in stdout.splitlines() if 'stopped after iter' in line]
    assert len(said) == 1 and said[0].startswith('SIGTERM: stopped after iter'), stdout[-3000:]
    stopped = int(said[0].split('iter ')[1].split()[0]) + 1
    tag = f'iter_{stopped}'
    assert 1 <= stopped < INTERRUPTED_ITERS and checkpoints.latest_tag(str(out)) == tag
    assert said[0] == f'SIGTERM: stopped after iter {stopped - 1} and saved {out / tag}; go on with ' \
                      '--init_from=resume'
    assert f'checkpoints: {out} ({tag} is the newest' in stdout
    assert not (out / 'final').exists()

    ok(launch([*args, f'--out_dir={out}', '--init_from=resume']))
    expected, got = by_iter(reference, 'loss'), by_iter(out, 'loss')
    assert sorted(got) == list(range(INTERRUPTED_ITERS))
    assert max(abs(expected[i] - got[i]) for i in expected) <= 1e-6
    # every eval of the run that never stopped, also one due at the iteration the stop saved (its save came
    # before that eval: the resumed run does it)
    for key in ('val_loss', 'train_loss'):
        expected, got = by_iter(reference, key), by_iter(out, key)
        assert sorted(got) == sorted(expected) and max(abs(expected[i] - got[i]) for i in got) <= 1e-6, key
    evals = [r for r in metrics(out) if 'val_loss' in r]
    last = evals[-1]
    names = [k for k in last if k.startswith('val_loss_')]
    assert len(names) == 2  # each dataset's val loss, and val_loss their 3:1 weighted mean
    backwards = next(n for n in names if 'char' not in n)
    weighted = 0.75 * last['val_loss_shakespeare_char'] + 0.25 * last[backwards]
    assert last['val_loss'] == pytest.approx(weighted)


def runner_sigtermed(out):
    """kill -TERM <pid of the deepspeed command>, once the run has logged an iter: (the process, its stdout,
    launch.py and the ranks)."""
    proc = start([*TINY, f'--out_dir={out}', '--max_iters=100000', '--eval_interval=100000'])
    wait_for_iters(out, 1, proc)
    below = psutil.Process(proc.pid).children(recursive=True)  # launch.py and the ranks
    proc.send_signal(signal.SIGTERM)  # to the runner alone
    return proc, finish(proc), below  # the ranks hold its stdout until they exit


def signalled_twice(out):
    """A world of one (plain python train_deepspeed.py) whose first step takes 5000 micro batches (half a
    minute or more), sent SIGTERM once the eval at iter 0 is logged and again 3 s later: (the process, its
    stdout, the seconds from the second signal to its end)."""
    cmd = [sys.executable, 'train_deepspeed.py', *TINY, f'--out_dir={out}',
           '--gradient_accumulation_steps=5000', '--max_iters=2']
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    wait_for_iters(out, 1, proc, key='val_loss')
    proc.send_signal(signal.SIGTERM)
    time.sleep(3)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout = finish(proc, timeout=60)
    return proc, stdout, time.time() - t


@pytest.fixture(scope='module')
def signalled(tmp_path_factory):
    """{'runner': runner_sigtermed's, 'twice': signalled_twice's, each with its out_dir}, both run at once:
    neither has a moment to catch to the millisecond nor a loss to compare, and two runs share the two cores
    better than one does."""
    not_in_a_fast_test('launches deepspeed')
    outs = {name: tmp_path_factory.mktemp(name) / 'out' for name in ('runner', 'twice')}
    with ThreadPoolExecutor(2) as pool:
        runner = pool.submit(runner_sigtermed, outs['runner'])
        twice = pool.submit(signalled_twice, outs['twice'])
        return {'runner': (*runner.result(), outs['runner']), 'twice': (*twice.result(), outs['twice'])}


def test_sigterm_to_the_deepspeed_command_saves(signalled):
    """kill -TERM <pid of the deepspeed command>, as a container's PID 1 or a batch system gets it:
    DeepSpeed's runner dies of it (143) and tells no rank; the ranks see it gone, finish the step, save and
    exit 0."""
    proc, stdout, below, out = signalled['runner']
    assert proc.returncode == -signal.SIGTERM, stdout[-3000:]
    said = [line for line in stdout.splitlines() if 'stopped after iter' in line]
    assert len(said) == 1, stdout[-3000:]
    assert said[0].startswith('the end of the deepspeed command: stopped after iter')
    tag = checkpoints.latest_tag(str(out))
    assert said[0].endswith(f'saved {out / tag}; go on with --init_from=resume')
    assert checkpoints.complete_tags(out) == [tag]
    _, alive = psutil.wait_procs(below, timeout=20)
    assert not alive


def test_second_signal_exits_at_once(signalled):
    """The first SIGTERM waits for the long step; the second, 3 s later, ends the run at once (128 + SIGTERM),
    saving nothing. Each rank's own signal handler decides this, so a world of one shows it."""
    proc, stdout, took_s, out = signalled['twice']
    assert proc.returncode == 128 + signal.SIGTERM and took_s < 20, stdout[-3000:]
    assert 'stopped after iter' not in stdout and checkpoints.latest_tag(str(out)) is None


def agreed_reason(rank, port, seen, results):
    """One rank of a 2-process gloo world: StopFlag.anywhere() after this rank has seen `seen`."""
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    flag = preemption.StopFlag(on_gpu=False, dist_timeout_s=0, out_dir='unused')
    flag.signal_name = seen
    results.put((rank, flag.anywhere()))
    dist.destroy_process_group()


def test_the_ranks_agree_on_why_they_stop():
    """Each rank's watcher notices the runner's end on its own second: rank 0, which says why the run stopped,
    says what the rank that noticed saw, not that it saw nothing."""
    ctx = multiprocessing.get_context('fork')
    results, port = ctx.Queue(), free_port()
    seen = [None, 'the end of the deepspeed command']
    procs = [ctx.Process(target=agreed_reason, args=(rank, port, seen[rank], results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    agreed = dict(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    assert agreed == {0: 'the end of the deepspeed command', 1: 'the end of the deepspeed command'}
