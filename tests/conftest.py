"""Helpers for tests that launch the real deepspeed launcher with CPU ranks over gloo."""
import ast
import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanogpt_ds import data_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: python, deepspeed
# a small model that trains in seconds on the real character-level Shakespeare data
TINY_RUN = ['--dataset=shakespeare_char', '--block_size=32', '--batch_size=8',
            '--gradient_accumulation_steps=1', '--dtype=float32', '--eval_iters=4', '--log_interval=1',
            '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4']
TINY = ['--init_from=scratch', '--n_layer=2', '--n_head=2', '--n_embd=64', *TINY_RUN]
# the saved_run fixture's: tests that compare a run with it (another JSON, compile) start from these
SAVED_RUN = [*TINY, '--max_iters=10', '--eval_interval=2', '--always_save_checkpoint=True', '--keep_last_n=2']
DEMO_ITERS = 175  # the cpu_demo fixture's cut of the demo's 700 iterations: up to its first eval
ZERO3_CHECKPOINTING = ['--deepspeed_config=ds_config_zero3.json', '--gradient_checkpointing=True']


# The edit loop: `pytest -m fast` runs the tests that start no deepspeed launch. A test is fast unless it is
# marked `launches` or asks for a fixture that launches; launch() refuses to run inside a fast test, so the
# marker cannot drift from what a test does.
LAUNCHING_FIXTURES = {'saved_run', 'saved_run_zero3', 'cpu_demo', 'unbroken_run', 'two_hosts',
                      'stopping_runs', 'signalled', 'weights_jobs', 'offload_runs', 'start_peaks'}
FAST_TESTS = set()  # node ids


def pytest_configure(config):
    config.addinivalue_line('markers', 'launches: starts deepspeed, or bench.py\'s runs (not in -m fast)')
    config.addinivalue_line('markers', 'fast: starts no deepspeed launch (-m fast, the edit loop)')


def pytest_collection_modifyitems(items):
    for item in items:
        launching = item.get_closest_marker('launches') or LAUNCHING_FIXTURES & set(item.fixturenames)
        if not launching:
            item.add_marker(pytest.mark.fast)
            FAST_TESTS.add(item.nodeid)


def not_in_a_fast_test(what):
    current = os.environ.get('PYTEST_CURRENT_TEST', '').rsplit(' ', 1)[0]
    assert current not in FAST_TESTS, f'{current} {what}: mark it @pytest.mark.launches'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def env(**extra):
    e = dict(os.environ, DS_ACCELERATOR='cpu', PYTHONUNBUFFERED='1',
             PATH=BIN + os.pathsep + os.environ['PATH'])
    for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CUDA_VISIBLE_DEVICES'):
        e.pop(k, None)
    return {**e, **extra}


# This machine as a CPU without bf16 kernels (an AVX2-only AMD EPYC, say): oneDNN and ATen capped at AVX2
# emulate bf16 for real, about 60x slower than fp32, and say they have no bf16 kernels.
AVX2_ONLY = dict(ONEDNN_MAX_CPU_ISA='AVX2', ATEN_CPU_CAPABILITY='avx2')


def launch(args, ranks=2, timeout=300, environ=None):
    """deepspeed --num_gpus <ranks> train_deepspeed.py <args>; the CompletedProcess (output merged)."""
    not_in_a_fast_test('launches deepspeed')
    cmd = [os.path.join(BIN, 'deepspeed'), '--num_gpus', str(ranks), '--master_port', str(free_port()),
           'train_deepspeed.py', *args]
    return subprocess.run(cmd, cwd=REPO, env=environ or env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def slow_rank(tmp_path, rank, seconds):
    """An environment in which rank `rank` of a launch starts `seconds` late: a sitecustomize that sleeps in
    that rank's interpreter before the script runs. The trainer itself is unchanged."""
    folder = tmp_path / 'slow'
    folder.mkdir(exist_ok=True)
    (folder / 'sitecustomize.py').write_text(
        f"import os, time\nif os.environ.get('RANK') == '{rank}':\n    time.sleep({seconds})\n")
    return env(PYTHONPATH=str(folder))


def run(cmd, timeout=300, merge_stderr=True, environ=None):
    return subprocess.run(cmd, cwd=REPO, env=environ or env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def sh(*args, environ=None, script=None, timeout=300):
    """run_deepspeed_xl.sh <args> (or a copy of it at script), run from its folder; output merged."""
    script = script or os.path.join(REPO, 'run_deepspeed_xl.sh')
    return subprocess.run([script, *args], cwd=os.path.dirname(script), env=environ or env(),
                          stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def one_error(proc):
    """The single 'error:' line of a failed command (stdout and stderr, merged or not): non-zero exit, exactly
    one such line, no traceback."""
    out = (proc.stdout or '') + (proc.stderr or '')
    errors = [line for line in out.splitlines() if line.startswith('error:')]
    assert proc.returncode != 0, out[-3000:]
    assert len(errors) == 1 and 'Traceback' not in out, out[-3000:]
    return errors[0]


def dry_run(*args, environ=None):
    """python train_deepspeed.py --dry_run=True <args>: no launcher, no process group."""
    return run([sys.executable, 'train_deepspeed.py', '--dry_run=True', *args], timeout=120, environ=environ)


def snapshot(root, ignore_logs=False):
    """relative path -> (sha256, mtime_ns) of every file, 'dir' for every folder; {} if root is absent.
    ignore_logs: leave out metrics.jsonl and run*.json, which every start appends to or writes."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            seen[os.path.relpath(os.path.join(folder, d), root)] = 'dir'
        for name in files:
            is_log = name == 'metrics.jsonl' or (name.startswith('run.') and name.endswith('.json'))
            if ignore_logs and is_log:
                continue
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            seen[os.path.relpath(path, root)] = (digest, os.stat(path).st_mtime_ns)
    return seen


def tiny_hf(path, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97):
    """A random transformers GPT-2 saved to path: the stand-in for OpenAI's weights, not reachable here."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                    vocab_size=vocab_size, bos_token_id=vocab_size - 1,
                                    eos_token_id=vocab_size - 1)).eval()
    hf.save_pretrained(path)
    return hf


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def by_iter(out_dir, key):
    """iter -> key ('loss', 'val_loss', ...) of a run's records, the last record of an iter winning: a run
    killed and resumed logs some iterations twice."""
    return {r['iter']: r[key] for r in metrics(out_dir) if key in r}


@pytest.fixture(scope='session', autouse=True)
def prepared_data():
    for name in ('shakespeare_char', 'shakespeare'):
        if not os.path.exists(os.path.join(REPO, 'data', name, 'val.bin')):
            ok(run([sys.executable, f'data/{name}/prepare.py']))


@pytest.fixture(scope='session')
def cpu_demo(tmp_path_factory):
    """(process, out_dir) of the README's first command after setup, ./run_deepspeed_xl.sh --cpu-demo, cut to
    its first quarter: 175 of its 700 iterations, the schedule ending there (the whole demo's loss and time
    are measured in docs/performance.md, not timed here)."""
    out = tmp_path_factory.mktemp('demo') / 'out'
    cmd = [os.path.join(REPO, 'run_deepspeed_xl.sh'), '--cpu-demo', '--master_port', str(free_port()),
           f'--out_dir={out}', f'--max_iters={DEMO_ITERS}', f'--lr_decay_iters={DEMO_ITERS}']
    proc = subprocess.run(cmd, cwd=REPO, env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=900)
    return proc, out


def script_function(name, **namespace):
    """A function as written in train_deepspeed.py, run against a namespace holding the constants it reads."""
    tree = ast.parse(open(os.path.join(REPO, 'train_deepspeed.py')).read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), 'train_deepspeed.py', 'exec'), namespace)
    return namespace[name]


def loss_of(model, x, y):
    """Cross-entropy of our GPT or of a transformers GPT2LMHeadModel (whose own loss shifts the labels)."""
    with torch.no_grad():
        logits = model(x, y)[0] if hasattr(model, 'get_num_params') else model(x).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)).item()


def one_source(folder):
    """The data globals get_batch reads, for a single dataset."""
    return dict(sources={'data': (folder, 1.0)}, source_names=['data'], source_weights=[1.0])


def batches_of(dataset, seeds, split, count, batch_size=8, block_size=32):
    """The batches train_deepspeed.py's get_batch draws from np.random.default_rng(seeds)."""
    get_batch = script_function('get_batch', np=np, torch=torch, os=os, block_size=block_size,
                                batch_size=batch_size, on_gpu=False,
                                **one_source(os.path.join(REPO, 'data', dataset)))
    rng = np.random.default_rng(seeds)
    return [get_batch(split, rng) for _ in range(count)]


def expected_eval(model, dataset='shakespeare_char', ranks=2, eval_iters=4, seed=1337, **shape):
    """What the trainer's estimate_loss reports for this model: rank r draws its eval batches from
    default_rng([seed, r, 1 + split]); each rank's mean, then the mean over ranks."""
    return {split: float(np.mean([np.mean([loss_of(model, x, y) for x, y in
                                           batches_of(dataset, [seed, r, 1 + i], split, eval_iters, **shape)])
                                  for r in range(ranks)]))
            for i, split in enumerate(('train', 'val'))}


def expected_first_loss(model, dataset='shakespeare_char', ranks=2, accumulation=1, seed=1337, **shape):
    """The loss the trainer logs at iter 0: the mean over every rank's micro batches, drawn from
    default_rng([seed, r])."""
    return float(np.mean([loss_of(model, x, y) for r in range(ranks)
                          for x, y in batches_of(dataset, [seed, r], 'train', accumulation, **shape)]))


@pytest.fixture(scope='session')
def mix(tmp_path_factory):
    """A dataset mix, 3:1, of Shakespeare's characters and a second dataset with their vocabulary: the same
    characters backwards."""
    char = os.path.join(REPO, 'data', 'shakespeare_char')
    folder = tmp_path_factory.mktemp('backwards')
    for split in ('train', 'val'):
        ids = np.fromfile(os.path.join(char, f'{split}.bin'), dtype=np.uint16)
        ids[::-1].tofile(folder / f'{split}.bin')
    shutil.copy(data_sources.vocabulary_file(char), folder)
    return {'shakespeare_char': 3, str(folder): 1}


@pytest.fixture(scope='session')
def saved_run(tmp_path_factory):
    """(out_dir, stdout) of a finished run that saved at every eval, keeping the newest two iter_* tags. Tests
    change only copies of out_dir."""
    out = tmp_path_factory.mktemp('run') / 'out'
    proc = ok(launch([*SAVED_RUN, f'--out_dir={out}']))
    return out, proc.stdout


@pytest.fixture(scope='session')
def saved_run_zero3(tmp_path_factory):
    """(out_dir, stdout) of saved_run's run under ZeRO-3 with gradient checkpointing (whose recomputation
    gathers the parameters again). Tests change only copies of out_dir."""
    out = tmp_path_factory.mktemp('run_zero3') / 'out'
    proc = ok(launch([*SAVED_RUN, *ZERO3_CHECKPOINTING, f'--out_dir={out}']))
    return out, proc.stdout


# Many independent single-process commands (error lines, --help): each imports torch to say its line, about
# 2 s of one core, so they run two at a time, this machine's two cores. A module fixture starts every case's
# command at once; each case stays its own test and takes its own result.
@pytest.fixture(scope='module')
def two_at_a_time():
    """A pool of two workers for a module's commands. Future.result() raises, in the one test that asks for
    it, whatever its case raised. The module's end waits for every command started."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def selected(request, tests, param='case'):
    """(test name, its `param` value, None if it has none) for each test of the requesting module named in
    `tests` that this session runs (after -k and -m), in running order: the cases a module fixture starts."""
    return [(item.originalname, item.callspec.params[param] if hasattr(item, 'callspec') else None)
            for item in request.session.items if item.module is request.module and item.originalname in tests]


# The run that test_preemption stops with a signal and test_kill_safe kills (-9), then resume: a dataset mix,
# dropout and gradient accumulation, so that every random stream must come back; 7 M parameters, so that a
# save lasts ~0.1-0.3 s (29 MB of weights, each rank 43 MB of fp32 master weights and Adam moments) and can
# be caught under way, while a micro batch of 2 keeps the iterations cheap. Saves iter_2, iter_4, final.
INTERRUPTED_ITERS = 6


def interrupted_run(mix):
    return [*TINY, '--n_layer=4', '--n_head=6', '--n_embd=384', '--batch_size=2', f'--dataset={mix}',
            '--dropout=0.1', '--gradient_accumulation_steps=2', f'--max_iters={INTERRUPTED_ITERS}',
            '--eval_interval=2', f'--lr_decay_iters={INTERRUPTED_ITERS}', '--always_save_checkpoint=True',
            '--peak_flops=1e12']  # no matmul timed at the start of each launch


@pytest.fixture(scope='session')
def unbroken_run(tmp_path_factory, mix):
    """(out_dir, args): interrupted_run's run never interrupted, what the interrupted ones must log once
    resumed. Tests change only copies of out_dir."""
    args = interrupted_run(mix)
    out = tmp_path_factory.mktemp('unbroken') / 'out'
    ok(launch([*args, f'--out_dir={out}']))
    return out, args
