"""
Throughput of the same model, data and global batch: a plain PyTorch loop (one process) against the real
trainer on the DeepSpeed engine with ZeRO 0, 2 and 3, on 1 and 2 ranks, side by side.
$ python bench.py                                  # CPU: a small GPT; 2 CPU ranks share this machine's cores
$ python bench.py --n_layer=12 --n_embd=768 --block_size=1024 --dtype=bfloat16 --json=bench.json
$ python bench.py --gpu_shapes=True                # GPUs: also the gpt2 (124M) and gpt2-xl shapes, block 1024
$ python bench.py --nanogpt=../nanoGPT             # also nanoGPT's own train.py, from a checkout of it
Rows: name, tokens_per_s (global), mfu, ratio_vs_plain, ratio_vs_nanogpt (with --nanogpt), run_s,
first_iter_s. The DeepSpeed rows are train_deepspeed.py itself, launched by the deepspeed launcher, timed from
its own metrics.jsonl; the nanoGPT row is its train.py, from its own log lines. The levers
(no phase timers: what time_phases costs; gradient checkpointing, compile, optimizer offload) each run beside
the ZeRO-2 1-rank row they change. run_s is a row's whole launch, start to exit, and
first_iter_s its first iteration, both from its first round, which compiles from an empty inductor cache: the
compile row's run_s less the plain ZeRO-2 row's is what compiling costs a first run.
"""
from configurator import answer_help

answer_help(__file__)  # --help or -h: the settings below, read from this file, before anything loads
import json as jsonlib  # the name json is the --json option below
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch

from model import GPT, PRETRAINED_SHAPES, GPTConfig, flops_per_token
from nanogpt_ds import data_sources
from nanogpt_ds.perf import PHASES, PhaseTimer, gpu_peak_flops, matmul_flops, model_gemms
from nanogpt_ds.settings import DTYPES, check_values, die, heads_problem, user_errors

LEVERS = {  # name -> (its row's suffix, the trainer's arguments for it)
    'no_phase_timers': ('no phase timers', ('--time_phases=False',)),  # what time_phases costs
    'gradient_checkpointing': ('gradient checkpointing', ('--gradient_checkpointing=True',)),
    'compile': ('compile', ('--compile=True',)),
    'offload': ('optimizer offload', ('--deepspeed_config=ds_config_zero2_offload.json',)),
}
NANOGPT_FILES = ('train.py', 'model.py', 'configurator.py')  # what the nanoGPT row runs from a checkout
NANOGPT_ROW = "nanoGPT's train.py, 1 process"
NANOGPT_ITER_LINE = re.compile(r'^iter (\d+): loss \S+, time ([\d.]+)ms', re.MULTILINE)
# -----------------------------------------------------------------------------
# the model, a GPT-2 from scratch
n_layer = 4
n_head = 4
n_embd = 256
block_size = 128  # tokens per sample
batch_size = 8  # micro batch per rank
# sequences per optimizer step, the same for every row: GA = global_batch / (batch_size x ranks)
global_batch = 32
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
dataset = 'shakespeare_char'
iters = 20  # timed optimizer steps per row, after warmup_iters untimed ones
warmup_iters = 3
# rounds over all rows, interleaved; each row keeps its best round (a shared machine's noise only slows)
repeats = 2
stages = '0,2,3'  # '' for no DeepSpeed rows
worlds = '1,2'  # rank counts for the DeepSpeed rows (GPUs, or CPU processes sharing the cores)
gpu_shapes = False  # also gpt2 and gpt2-xl at block 1024 (a GPU with the memory for them)
levers = 'no_phase_timers,gradient_checkpointing,compile,offload'  # each a row beside ZeRO-2 on 1 rank
json = ''  # a file to write the rows to, as JSON
nanogpt = ''  # a checkout of nanoGPT (its train.py, model.py, configurator.py): a row of its own train.py
# -----------------------------------------------------------------------------
from configurator import configure

configure(globals())


def listed(name, text, allowed):
    """The numbers of a comma-separated option like --stages=0,2,3; ValueError naming any other."""
    items = [item.strip() for item in text.split(',') if item.strip()]
    wrong = [item for item in items if not item.isdigit() or int(item) not in allowed]
    if wrong:
        raise ValueError(f"{name}={text!r}: {', '.join(wrong)} cannot work; give numbers from "
                         f'{allowed.start} to {allowed.stop - 1}, comma-separated, like --{name}=1,2')
    return [int(item) for item in items]


# every setting and every row's batch split, checked before anything is timed
with user_errors():
    check_values(globals(), at_least=dict(n_layer=1, n_head=1, n_embd=1, block_size=1, batch_size=1,
                                          global_batch=1, iters=1, warmup_iters=0, repeats=1),
                 named=('dataset',), choices={'dtype': DTYPES})
    stage_list, world_list = listed('stages', stages, range(4)), listed('worlds', worlds, range(1, 1025))
    data_sources.resolve(dataset, block_size)  # its .bin files there and long enough
heads = heads_problem(n_embd, n_head)
if heads:
    die(heads)
unknown = [lever for lever in levers.split(',') if lever and lever not in LEVERS]
if unknown:
    die(f"levers: unknown {', '.join(unknown)}; use some of {','.join(LEVERS)} (or '' for none)")
if global_batch % batch_size:
    die(f'global_batch={global_batch} is not a multiple of batch_size={batch_size}')
for ranks in world_list:
    if global_batch % (batch_size * ranks):
        die(f'global_batch={global_batch} does not split into micro batches of {batch_size} '
            f'over {ranks} ranks')
if nanogpt:
    missing = [name for name in NANOGPT_FILES if not os.path.isfile(os.path.join(nanogpt, name))]
    if missing:
        die(f"--nanogpt={nanogpt}: no {', '.join(missing)} there; name a checkout of nanoGPT "
            f"(docs/performance.md#against-nanogpt says how to get one)")
HERE = os.path.dirname(os.path.abspath(__file__))
on_gpu = torch.cuda.is_available()
device = 'cuda' if on_gpu else 'cpu'


def batches(block_size):
    """Endless (x, y) micro batches of block_size tokens: the shape's, not the --block_size option, which
    the gpt2 and gpt2-xl rows do not use (a GPU smoke found their plain rows timing 128-token sequences)."""
    data = np.memmap(os.path.join(data_sources.folder(dataset), 'train.bin'), dtype=np.uint16, mode='r')
    rng = np.random.default_rng(0)
    while True:
        ix = rng.integers(0, len(data) - block_size, size=batch_size)
        x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
        yield x.to(device), y.to(device)


def plain(shape, accumulation, compiled=False):
    """nanoGPT's loop: autocast for 16-bit, AdamW, clipping, a loss.item() every step as the trainer
    logs it; compiled: torch.compile's model, as nanoGPT's compile=True."""
    torch.manual_seed(0)
    model = GPT(shape).to(device)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    if compiled:
        model = torch.compile(model)
    if dtype == 'float32':
        ctx = torch.autocast(device, enabled=False)
    else:
        ctx = torch.autocast(device, dtype=getattr(torch, dtype))
    data = batches(shape.block_size)
    times = []
    for it in range(warmup_iters + iters):
        t0 = time.perf_counter()
        for _ in range(accumulation):
            x, y = next(data)
            with ctx:
                _, loss = model(x, y)
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup_iters:])


def nanogpt_run(shape, accumulation, workdir):
    """nanoGPT's own train.py on this shape, micro batch, accumulation, data and dtype, eager as the plain
    loop: the median of its logged per-iter times after warmup. nanoGPT reads configurator.py and
    data/<dataset>/ from its working directory, so it runs in a folder of links to the checkout's files and
    this dataset's .bin files, with a meta.pkl that gives it the shape's vocabulary: the checkout is only
    read, and nothing of it is copied here."""
    run_dir = os.path.join(workdir, 'nanogpt')
    data_dir = os.path.join(run_dir, 'data', 'bench')
    if not os.path.isdir(data_dir):
        os.makedirs(data_dir)
        for name in NANOGPT_FILES:
            os.symlink(os.path.abspath(os.path.join(nanogpt, name)), os.path.join(run_dir, name))
        for split in ('train', 'val'):
            source = os.path.join(data_sources.folder(dataset), f'{split}.bin')
            os.symlink(os.path.abspath(source), os.path.join(data_dir, f'{split}.bin'))
    with open(os.path.join(data_dir, 'meta.pkl'), 'wb') as f:  # the shapes differ in it (gpu_shapes)
        pickle.dump({'vocab_size': shape.vocab_size}, f)
    cmd = [sys.executable, 'train.py', f'--device={device}', f'--dtype={dtype}', '--compile=False',
           '--dataset=bench', f'--n_layer={shape.n_layer}', f'--n_head={shape.n_head}',
           f'--n_embd={shape.n_embd}', f'--block_size={shape.block_size}', f'--bias={shape.bias}',
           f'--dropout={shape.dropout}', f'--batch_size={batch_size}',
           f'--gradient_accumulation_steps={accumulation}', f'--max_iters={warmup_iters + iters}',
           f'--eval_interval={10 ** 9}', '--eval_iters=1', '--log_interval=1',
           '--always_save_checkpoint=False', f'--out_dir={os.path.join(run_dir, "out")}']
    proc = subprocess.run(cmd, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    times = {int(it): float(ms) / 1e3 for it, ms in NANOGPT_ITER_LINE.findall(proc.stdout)}
    timed = [times[it] for it in range(warmup_iters, warmup_iters + iters) if it in times]
    if proc.returncode != 0 or len(timed) < iters:
        shutil.rmtree(workdir, ignore_errors=True)
        command = ' '.join(cmd)
        die(f'nanoGPT ({nanogpt}) did not run as expected: {command}\n{proc.stdout[-3000:]}')
    return statistics.median(timed)


first_round = {}  # row name -> (run_s, first_iter_s) of its first round


def deepspeed_run(shape, stage, ranks, accumulation, workdir, row, extra=()):
    """train_deepspeed.py on `ranks` ranks; the median of its logged per-iter times after warmup. Every row
    states compile (auto would compile on GPUs) and its JSON, unless extra says otherwise."""
    config_name = 'ds_config_zero2.json' if stage < 3 else 'ds_config_zero3.json'
    cfg = jsonlib.load(open(os.path.join(HERE, config_name)))
    cfg['zero_optimization'] = {**cfg.get('zero_optimization', {}), 'stage': stage} if stage else {'stage': 0}
    config_path = os.path.join(workdir, f'zero{stage}.json')
    jsonlib.dump(cfg, open(config_path, 'w'))
    out = os.path.join(workdir, 'out')
    deepspeed = os.path.join(os.path.dirname(sys.executable), 'deepspeed')
    cmd = [deepspeed, '--num_gpus', str(ranks), 'train_deepspeed.py', '--init_from=scratch',
           f'--n_layer={shape.n_layer}', f'--n_head={shape.n_head}', f'--n_embd={shape.n_embd}',
           f'--block_size={shape.block_size}', f'--batch_size={batch_size}',
           f'--gradient_accumulation_steps={accumulation}', f'--dataset={dataset}', f'--dtype={dtype}',
           f'--deepspeed_config={config_path}', f'--out_dir={out}', f'--max_iters={warmup_iters + iters}',
           f'--eval_interval={10 ** 9}', '--eval_iters=1', '--log_interval=1', '--warmup_iters=0',
           '--progress=False', f'--peak_flops={peak}', '--compile=False', *extra]
    inductor_cache = tempfile.mkdtemp(dir=workdir)  # every compile from nothing, as on a new machine
    env = dict(os.environ, PYTHONUNBUFFERED='1', TORCHINDUCTOR_CACHE_DIR=inductor_cache)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        # die exits at once (os._exit): the TemporaryDirectory around the rows would not clean up
        shutil.rmtree(workdir, ignore_errors=True)
        command = ' '.join(cmd)
        die(f'{command} failed:\n{proc.stdout[-3000:]}')
    records = [jsonlib.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]
    times = [r['dt_ms'] / 1e3 for r in records if 'dt_ms' in r and r['iter'] >= warmup_iters]
    first_iter_s = next(r['dt_ms'] / 1e3 for r in records if 'dt_ms' in r)
    first_round.setdefault(row, (time.perf_counter() - t0, first_iter_s))
    shutil.rmtree(out, ignore_errors=True)  # the checkpoint is not what we came for
    shutil.rmtree(inductor_cache, ignore_errors=True)
    return statistics.median(times)


with user_errors():
    meta = data_sources.read_meta(data_sources.vocabulary_file(data_sources.folder(dataset)))  # or GPT-2's
vocab_size = meta['vocab_size'] if meta else 50304
shapes = {'bench': GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                             vocab_size=vocab_size)}
if gpu_shapes and on_gpu:
    for name in ('gpt2', 'gpt2-xl'):
        L, H, D = PRETRAINED_SHAPES[name]
        shapes[name] = GPTConfig(n_layer=L, n_head=H, n_embd=D, block_size=1024, vocab_size=50304)
if on_gpu:
    peak = gpu_peak_flops(torch.cuda.get_device_name(), dtype) or 0.0
    peak_note = f'{torch.cuda.get_device_name()} data sheet' if peak else 'unknown GPU: MFU not shown'
else:  # per rank, with the threads a rank gets; the plain loop's MFU uses the whole-machine figure
    gemms = model_gemms(batch_size * block_size, n_embd, vocab_size)
    peak = max(matmul_flops(dtype, *gemm, seconds=0.15) for gemm in gemms)
    peak_note = "the model's matmuls timed here"

rows = []
with tempfile.TemporaryDirectory() as workdir:
    for label, shape in shapes.items():
        tokens = global_batch * shape.block_size
        fpt = flops_per_token(shape)
        plain_accumulation = global_batch // batch_size
        runs = [('plain PyTorch, 1 process', partial(plain, shape, plain_accumulation), 1)]
        if nanogpt:
            measure = partial(nanogpt_run, shape, plain_accumulation, workdir)
            runs.append((NANOGPT_ROW, measure, 1))
        if on_gpu and 'compile' in levers.split(','):  # the reference for the trainer's compiled rows
            compiled = partial(plain, shape, plain_accumulation, compiled=True)
            runs.append(('plain PyTorch, 1 process, compile', compiled, 1))
        for ranks in world_list:
            accumulation = global_batch // (batch_size * ranks)
            for stage in stage_list:
                plural = 's' if ranks > 1 else ''
                name = f'DeepSpeed ZeRO-{stage}, {ranks} rank{plural}'
                measure = partial(deepspeed_run, shape, stage, ranks, accumulation, workdir, name)
                runs.append((name, measure, ranks))
                if stage == 2 and ranks == 1:
                    variants = [LEVERS[lever] for lever in levers.split(',') if lever]
                    for suffix, extra in variants:
                        row = f'{name}, {suffix}'
                        measure = partial(deepspeed_run, shape, 2, 1, accumulation, workdir, row, extra)
                        runs.append((row, measure, 1))
        best = [0.0] * len(runs)
        for round_ in range(repeats):
            for i, (name, measure, ranks) in enumerate(runs):
                best[i] = max(best[i], tokens / measure())
                print(f'round {round_ + 1}/{repeats}: {name}: best so far {best[i]:,.0f} tok/s',
                      file=sys.stderr, flush=True)
        for (name, _, ranks), tps in zip(runs, best):
            # MFU over the devices in use; CPU ranks share one machine's peak
            devices = ranks if on_gpu else 1
            row = dict(name=f'{label}: {name}' if len(shapes) > 1 else name, tokens_per_s=tps,
                       mfu=fpt * tps / (devices * peak) if peak else None, ratio_vs_plain=tps / best[0],
                       run_s=None, first_iter_s=None)
            versus = ''
            if nanogpt:  # the reference a user compares with: the same loop in nanoGPT's own code
                row['ratio_vs_nanogpt'] = tps / best[1]
                versus = f"  {row['ratio_vs_nanogpt']:.3f}x nanoGPT"
            first = ''
            if name in first_round:
                row['run_s'], row['first_iter_s'] = first_round[name]
                first = f"  run {row['run_s']:.0f} s, first iter {row['first_iter_s']:.1f} s"
            rows.append(row)
            print(f"{row['name']:<58} {tps:>12,.0f} tok/s  MFU {row['mfu'] or 0:6.1%}  "
                  f"{row['ratio_vs_plain']:.3f}x plain{versus}{first}", flush=True)
        first_round.clear()  # the next shape's rows have the same names


def timer_cost_s(marks=20000):
    """What one PhaseTimer mark costs in the loop: a perf_counter (CPU) or a recorded CUDA event (GPU), kept
    in a list until the log line reads them (fractions() runs once a log interval and is not counted here)."""
    timer = PhaseTimer(use_events=on_gpu)
    t0 = time.perf_counter()
    for i in range(marks):
        timer.mark(PHASES[i % len(PHASES)])
        if len(timer.marks) > 1000:  # a log interval's worth, as in the loop
            timer.marks = timer.marks[-1:]
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / marks


zero2 = next((r for r in rows if r['name'].endswith('ZeRO-2, 1 rank')), None)
# the trainer marks 'other' and 'data' once an iteration, then data/forward/backward/step per micro step
if zero2:
    accumulation = global_batch // batch_size
    marks, mark_s = 4 * accumulation + 1, timer_cost_s()
    iter_s = global_batch * block_size / zero2['tokens_per_s']
    per_iter_ms = marks * mark_s * 1e3
    print(f'phase timers: {mark_s * 1e6:.2f} us a mark x {marks} marks an iteration = {per_iter_ms:.3f} ms, '
          f'{marks * mark_s / iter_s:.4%} of the ZeRO-2 1-rank iteration ({iter_s * 1e3:.0f} ms)')
print(f'\n{len(rows)} rows; {dtype}; micro batch {batch_size}, '
      f'{global_batch} sequences of {block_size} per step; '
      f'median of {iters} iters after {warmup_iters}, best of {repeats} rounds; '
      f'peak: {peak / 1e12:.3g} TFLOP/s ({peak_note})')
if json:
    with open(json, 'w') as f:
        jsonlib.dump(rows, f, indent=1)
