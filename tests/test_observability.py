"""What a run shows about itself, on real 2-rank runs: MFU, the phase breakdown, memory, run.json, the
progress bar, and the same figures in wandb (offline), tensorboard and loss.png; a resumed run keeps its
wandb run."""
import concurrent.futures
import glob
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from importlib.metadata import version

import pytest
from conftest import BIN, REPO, TINY, dry_run, env, free_port, launch, metrics, not_in_a_fast_test, ok, run

from model import GPTConfig, flops_per_token
from nanogpt_ds import checkpoints


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')


@pytest.mark.launches
def test_metrics_logs_and_resume_keep_one_wandb_run(tmp_path):
    """The first run on a terminal (a pty): tqdm's bar on rank 0 with the log lines above it (off the
    terminal there is no bar: test_deepspeed_runs' saved run); resumed, the same wandb run goes on."""
    out = tmp_path / 'out'
    args = [*TINY, f'--out_dir={out}', '--wandb_log=True', '--tensorboard_log=True',
            '--gradient_accumulation_steps=2']
    shown = in_a_terminal([*args, '--max_iters=4', '--eval_interval=2', '--plot=True'])
    assert re.search(r'\b4/4 \[', shown) and ('iter/s' in shown or 's/iter' in shown)  # tqdm's bar, its rate
    train = [r for r in metrics(out) if 'loss' in r]
    assert [r['iter'] for r in train] == [0, 1, 2, 3]
    for r in train:
        assert 0 < r['mfu'] < 1 and r['rss_mb'] > 50 and r['peak_rss_mb'] >= r['rss_mb'] * 0.99
        shares = {k[:-5]: v for k, v in r.items() if k.endswith('_frac')}
        assert {'data', 'forward', 'backward', 'step'} <= set(shares) and abs(sum(shares.values()) - 1) < 1e-6
        assert shares['forward'] > 0.02 and shares['backward'] > 0.02
        assert r['grad_norm'] > 0  # DeepSpeed's own, ZeRO-2's
    line_3 = r'iter 3: loss [\d.]+, lr \S+, grad norm [\d.]+, .*MFU [\d.]+% \(data \d+% forward \d+%'
    assert re.search(line_3, shown)  # above the bar
    assert 'MFU against' in shown and "the model's matmuls timed at start" in shown

    run = json.load(open(out / 'run.json'))
    assert run['world_size'] == 2 and len(run['devices']) == 2 and run['config']['max_iters'] == 4
    threads = max(1, os.cpu_count() // 2)  # two ranks share this host's cores, not each all of them
    assert [d.split(': ')[1] for d in run['devices']] == [f'cpu, {threads} threads'] * 2
    assert run['ds_config']['train_batch_size'] == 8 * 2 * 2
    # the versions this start ran with: the ones installed here, whatever they are
    assert run['versions']['python'] == platform.python_version()
    assert run['versions']['torch'] == version('torch')
    assert run['versions']['deepspeed'] == version('deepspeed')
    assert re.fullmatch(r'[0-9a-f]{40}', run['git_commit']) and isinstance(run['git_dirty'], bool)
    assert (out / 'loss.png').stat().st_size > 1000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / 'tensorboard')).Reload()
    assert [e.step for e in events.Scalars('loss')] == [0, 1, 2, 3]
    assert [e.step for e in events.Scalars('val_loss')] == [0, 2, 4]
    assert [e.step for e in events.Scalars('grad_norm')] == [0, 1, 2, 3]

    state = checkpoints.read_client_state(str(out / 'final'))
    run_id = state['wandb_run_id']
    assert run_id and len(glob.glob(str(out / 'wandb' / f'offline-run-*-{run_id}'))) == 1

    # resumed, with a given peak: the same wandb run goes on, MFU is exactly model FLOPs over that peak
    ok(launch([*args, '--max_iters=6', '--eval_interval=2', '--init_from=resume', '--peak_flops=1e12']))
    assert len(glob.glob(str(out / 'wandb' / f'offline-run-*-{run_id}'))) == 2
    assert len(glob.glob(str(out / 'wandb' / 'offline-run-*'))) == 2
    fpt = flops_per_token(GPTConfig(**{**state['model_args'], 'block_size': 32}))
    for r in [r for r in metrics(out) if 'loss' in r][4:]:
        assert r['mfu'] == pytest.approx(fpt * r['tokens_per_s'] / 2e12, rel=1e-9)
    first_start = json.load(open(out / 'run.1.json'))  # the first start's run.json, kept
    resumed = json.load(open(out / 'run.json'))
    assert first_start['resumed_at'] is None and resumed['resumed_at'] == 4


def test_grad_norm_is_before_clipping_at_every_stage(tmp_path):
    """The logged gradient norm is the one clipping starts from: DeepSpeed's get_global_grad_norm where it
    keeps one (ZeRO-2 here), the trainer's own where it keeps none (ZeRO-0 in fp32); the same first iteration
    gives the same norm both ways, above grad_clip (so not the clipped one)."""
    zero0 = tmp_path / 'zero0.json'
    config = json.load(open(os.path.join(REPO, 'ds_config_zero2.json')))
    zero0.write_text(json.dumps({**config, 'zero_optimization': {'stage': 0}}))
    stages = {'zero0': zero0, 'zero2': 'ds_config_zero2.json'}
    commands = [[sys.executable, 'train_deepspeed.py', *TINY, f'--out_dir={tmp_path / name}', '--max_iters=2',
                 '--eval_interval=2', f'--deepspeed_config={ds_config}', '--grad_clip=1.0']
                for name, ds_config in stages.items()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # one core each
        for proc in pool.map(run, commands):
            ok(proc)
    norms = {name: [r['grad_norm'] for r in metrics(tmp_path / name) if 'loss' in r] for name in stages}
    assert norms['zero0'][0] == pytest.approx(norms['zero2'][0], rel=1e-4)
    assert norms['zero0'][0] > 1.0 and len(norms['zero0']) == len(norms['zero2']) == 2


def in_a_terminal(args, ranks=2):
    """Run the launcher (or, for one rank, plain python) under script(1), which gives it a pty (of a real
    width: tqdm draws nothing in 0 columns)."""
    not_in_a_fast_test('launches train_deepspeed.py')
    if ranks == 1:
        cmd = [sys.executable, 'train_deepspeed.py', *args]
    else:
        deepspeed = os.path.join(BIN, 'deepspeed')
        cmd = [deepspeed, '--num_gpus', str(ranks), '--master_port', str(free_port()), 'train_deepspeed.py',
               *args]
    in_the_pty = 'stty cols 120 rows 40; ' + shlex.join(cmd)
    proc = subprocess.run(['script', '-qefc', in_the_pty, '/dev/null'], cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


@pytest.mark.launches
def test_no_progress_bar_when_asked_on_a_terminal(tmp_path):
    """--progress=False: plain log lines on a terminal too (the bar itself: the test above)."""
    plain = in_a_terminal([*TINY, '--max_iters=3', '--eval_interval=3', f'--out_dir={tmp_path}',
                           '--progress=False'], ranks=1)
    assert not re.search(r'\d/3 \[', plain) and 'iter 2: loss' in plain


def test_dry_run_plans_gpt2_xl_on_four_gpus_from_here(tmp_path):
    """Plain python, no launcher, no GPU, no weights: the exact parameter count, the batch identity, a row per
    ZeRO stage and offload, and a recommendation that keeps the global batch. Nothing is written. The headline
    config names the job (gpt2-xl, 1 x 32 per GPU, ZeRO-2 JSON), so the plan does not hang on the defaults."""
    headline = 'config/train_gpt2_xl_shakespeare.py'
    args = [headline, '--plan_gpus=4', '--dtype=float16', f'--out_dir={tmp_path / "out"}']
    proc = ok(dry_run(*args, '--plan_gpu_mem_gb=32'))
    assert '1,557,611,200 parameters' in proc.stdout
    assert '1 (micro) x 32 (accumulation) x 4 (world) = 128 sequences' in proc.stdout
    row = r'^\s+([0-3])\s+(none|optimizer|optimizer\+params)\s+1 x 32\s+([\d.]+\s+){5}(yes|NO)\s*(<- \S+)?$'
    rows = re.findall(row, proc.stdout, re.M)
    assert len(rows) == 8 and rows[0][3] == 'NO' and rows[3][:2] == ('2', 'none') and rows[3][3] == 'yes'
    marked = [r[:2] for r in rows if r[4]]  # the row of the JSON in use
    assert marked == [('2', 'none')] and rows[3][4] == '<- ds_config_zero2.json'
    recommended = r'recommended .*--batch_size=(\d+) --gradient_accumulation_steps=(\d+)'
    micro, accum = map(int, re.search(recommended, proc.stdout).groups())
    assert micro * accum * 4 == 128
    # no process group, nothing written
    assert not (tmp_path / 'out').exists() and 'shm_comm' not in proc.stdout
    every_lever = ('--deepspeed_config=ds_config_zero3_offload.json --batch_size=1 '
                   '--gradient_accumulation_steps=32 --gradient_checkpointing=True')
    assert every_lever in ok(dry_run(*args, '--plan_gpu_mem_gb=2')).stdout  # 1.6 GiB planned
    assert 'nothing fits' in ok(dry_run(*args, '--plan_gpu_mem_gb=1')).stdout


@pytest.mark.launches
def test_a_recommendation_runs_as_printed(tmp_path):
    """A model whose activations decide (4 x 128 at block 1024, 16 sequences a rank), planned for 2 GPUs of
    0.78 GiB: the dry run recommends another shipped JSON and gradient checkpointing, and its overrides,
    pasted after the same command, train (2 CPU ranks stand in for the GPUs)."""
    shape = ['--init_from=scratch', '--n_layer=4', '--n_head=4', '--n_embd=128', '--block_size=1024',
             '--dataset=shakespeare_char', '--dtype=float32', '--batch_size=16',
             '--gradient_accumulation_steps=1']
    planned = ok(dry_run(*shape, '--plan_gpus=2', '--plan_gpu_mem_gb=0.78')).stdout
    recommended = next(line for line in planned.splitlines() if line.startswith('recommended'))
    overrides = re.findall(r'--\w+=\S+', recommended)
    given = dict(o[2:].split('=', 1) for o in overrides)
    assert given['deepspeed_config'] == 'ds_config_zero3.json' and given['gradient_checkpointing'] == 'True'
    out = tmp_path / 'out'
    proc = ok(launch([*shape, *overrides, f'--out_dir={out}', '--max_iters=1', '--eval_iters=1']))
    batch = f"{given['batch_size']} x {given['gradient_accumulation_steps']} x 2 = 32 sequences"
    assert 'ZeRO-3, float32, 2 rank(s)' in proc.stdout and batch in proc.stdout
    ran = json.load(open(out / 'run.json'))['config']
    assert ran['gradient_checkpointing'] is True and [r['iter'] for r in metrics(out) if 'loss' in r] == [0]


def test_dry_run_predicts_the_cpu_demo_memory(tmp_path, cpu_demo):
    """The plan for this machine's own CPU ranks (the demo's ZeRO-2 row over the measured runtime) against the
    peak resident memory the real 2-rank demo reaches: within 25%."""
    demo = ['config/train_shakespeare_char_cpu.py', f'--out_dir={tmp_path / "out"}']
    predicted = float(re.search(r'about ([\d.]+) GiB resident per rank', ok(dry_run(*demo)).stdout).group(1))
    measured = max(r['peak_rss_mb'] for r in metrics(cpu_demo[1]) if 'peak_rss_mb' in r) / 1024
    assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured)


def test_dry_run_needs_no_data(tmp_path):
    """Planning the headline GPU job from a laptop without prepared data: a note in the plan, no error."""
    proc = ok(dry_run('config/train_gpt2_xl_shakespeare.py', '--plan_gpus=4', '--plan_gpu_mem_gb=32',
                      f'--dataset={tmp_path / "none"}', f'--out_dir={tmp_path / "out"}'))
    assert f'note: no usable data ({tmp_path / "none"}/train.bin not found' in proc.stdout
    assert '1,557,611,200 parameters' in proc.stdout and 'recommended' in proc.stdout
    assert not (tmp_path / 'out').exists()
