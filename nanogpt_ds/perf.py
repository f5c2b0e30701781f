"""
The trainer's measuring helpers, kept out of the loop: peak FLOP/s for MFU, a per-phase timer that adds no
host sync, and memory figures. MFU is model FLOPs (model.py's flops_per_token) over the device's peak.
"""
import dataclasses
import json
import math
import os
import re
import resource
import socket
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import flops_per_token
from nanogpt_ds import PROJECT

# Dense peak TFLOP/s for the matmul dtype (no sparsity), from the vendors' data sheets. 'float32' is TF32
# where the GPU has it, since the trainer enables TF32 matmuls. Matched against torch's device name, in
# order, on word boundaries (so 'A10' does not claim an A100 or an A10G).
PEAK_TFLOPS = [  # (name pattern, {dtype: TFLOP/s})
    (r'H100.*PCIe', {'bfloat16': 756, 'float16': 756, 'float32': 378}),
    (r'H100', {'bfloat16': 989, 'float16': 989, 'float32': 494}),  # SXM
    (r'H200', {'bfloat16': 989, 'float16': 989, 'float32': 494}),
    (r'A100', {'bfloat16': 312, 'float16': 312, 'float32': 156}),
    (r'V100', {'float16': 125, 'float32': 15.7}),  # no bf16, no TF32
    (r'L4', {'bfloat16': 121, 'float16': 121, 'float32': 60}),
    (r'A10', {'bfloat16': 125, 'float16': 125, 'float32': 62.5}),
    (r'RTX 4090', {'bfloat16': 165, 'float16': 165, 'float32': 82.6}),  # fp32 accumulate
    (r'RTX 3090', {'bfloat16': 71, 'float16': 71, 'float32': 35.6}),
]


def gpu_peak_flops(device_name, dtype):
    """Peak FLOP/s of one GPU in dtype, or None when the table does not know it."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(rf'\b{pattern}\b', device_name):
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None


def matmul_flops(dtype, m=512, k=512, n=512, seconds=0.5):
    """This process's FLOP/s for the model's matmul, F.linear of (m, k) by (n, k) weights, in dtype with its
    threads: the fastest of the calls made in about `seconds`, so that a moment of a busy machine (wandb
    starting beside the rank took a mean to 1% of the peak) does not lower it. Its own generator: the global
    stream belongs to the run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(getattr(torch, dtype))
    w = torch.randn(n, k, generator=g).to(getattr(torch, dtype))
    F.linear(x, w)  # warm up
    fastest_s, stop_at = math.inf, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        F.linear(x, w)
        t1 = time.perf_counter()
        fastest_s = min(fastest_s, t1 - t0)
        if t1 >= stop_at:
            return 2 * m * k * n / fastest_s


def model_gemms(tokens, n_embd, vocab_size):
    """(m, k, n) of the model's matmuls for a micro batch of `tokens`: attention in and out, MLP up and down,
    the head."""
    return [(tokens, n_embd, 3 * n_embd), (tokens, n_embd, n_embd), (tokens, n_embd, 4 * n_embd),
            (tokens, 4 * n_embd, n_embd), (tokens, n_embd, vocab_size)]


PHASES = ('data', 'forward', 'backward', 'step', 'other')  # the order log lines show them in


def device_peak_flops(given, dtype, gpu_name=None, gemms=()):
    """(peak FLOP/s of one device, where it came from), 0.0 when unknown. On CPU, no data-sheet figure means
    much (turbo, AVX units, the threads we get): the peak is the fastest of the model's own matmul shapes
    (gemms) in its dtype. Collective there: every rank times at once, sharing the cores as in training, and
    all take the mean."""
    if given > 0:
        return given, 'given as peak_flops'
    if gpu_name:
        return gpu_peak_flops(gpu_name, dtype) or 0.0, 'data sheet'
    best = max(matmul_flops(dtype, *gemm, seconds=0.05) for gemm in gemms)
    peak = torch.tensor(best, dtype=torch.float64)
    dist.all_reduce(peak)
    return peak.item() / dist.get_world_size(), "the model's matmuls timed at start"


def mfu(flops_per_s, world_size, peak_flops):
    """(model FLOPs utilisation, '') or (None, why it is not shown). Above 1 the peak was wrong (measured on a
    busy machine, or a kernel beat the one timed), never the run fast: the figure is left out."""
    if not peak_flops:
        return None, ''  # the start line said so
    share = flops_per_s / (world_size * peak_flops)
    if share > 1:
        return None, (f'MFU not shown: the run reached {share:.0%} of the peak in use, so that peak is too '
                      f'low (measured on a busy machine?); give --peak_flops=<FLOP/s of one device>')
    return share, ''


def start_line(config, n_params, world_size, where, tokens_per_iter):
    """The start's first line: the model, ZeRO and precision, the ranks, and the batch identity; and a note
    when ZeRO runs on one rank (docs/performance.md: ZeRO-2 ran 0.89x the plain loop on one CPU rank)."""
    micro, accumulation = config['batch_size'], config['gradient_accumulation_steps']
    stage = config['zero_stage']
    line = (f"{config['init_from']} -> {n_params / 1e6:.2f}M parameters; ZeRO-{stage}, {config['dtype']}, "
            f'{world_size} rank(s) on {where}; train_batch_size = {micro} x {accumulation} x {world_size} = '
            f'{micro * accumulation * world_size} sequences, {tokens_per_iter:,} tokens per iter')
    if world_size == 1 and stage > 0:
        line += f'\nnote: ZeRO-{stage} on one rank partitions nothing and costs time; "stage": 0 is faster'
    return line


def eval_line(iter_num, losses):
    """Rank 0's line for an eval: train and val loss, and a mix's val loss per dataset."""
    line = f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
    for key, loss in losses.items():
        if key.startswith('val_loss_'):
            line += f", {key[len('val_loss_'):]} {loss:.4f}"
    return line


def log_line(r):
    """Rank 0's line for a metrics record: the figures it holds, comma-separated."""
    parts = [f"iter {r['iter']}: loss {r['loss']:.4f}", f"lr {r['lr']:.3e}"]
    if 'grad_norm' in r:
        parts.append(f"grad norm {r['grad_norm']:.3f}")
    parts += [f"time {r['dt_ms']:.2f}ms", f"{r['tokens_per_s']:,.0f} tok/s"]
    if 'mfu' in r:
        parts.append(f"MFU {r['mfu'] * 100:.1f}%")
    shares = [f"{p} {r[p + '_frac'] * 100:.0f}%" for p in PHASES if p + '_frac' in r]
    if shares:  # where the time went, in brackets after the speed it explains
        phases = ' '.join(shares)
        parts[-1] += f' ({phases})'
    if 'gpu_alloc_mb' in r:
        parts.append(f"GPU {r['gpu_alloc_mb'] / 1024:.1f}/{r['gpu_reserved_mb'] / 1024:.1f} GB")
    parts.append(f"RSS {r['rss_mb'] / 1024:.2f} GB")
    if 'loss_scale' in r:
        parts.append(f"loss scale {r['loss_scale']:g} ({r['skipped_steps']} skipped)")
    return ', '.join(parts)


def progress_bar(shown, total, initial):
    """(tqdm bar, say): the bar when asked for and stdout is a terminal, else a disabled one that draws
    nothing (plain lines); say prints a line, above the bar when there is one."""
    from tqdm import tqdm
    if not shown or not sys.stdout.isatty():
        return tqdm(disable=True), print
    bar = tqdm(total=total, initial=initial, unit='iter', dynamic_ncols=True)
    return bar, bar.write


class PhaseTimer:
    """Where an iteration's time goes. mark(phase) gives the time since the previous mark to `phase`. On a GPU
    the marks are CUDA events, read at the log interval after the loss sync has drained the queue, so the
    timing adds no host sync and measures what the GPU did (idle gaps included); on CPU the work is
    synchronous and perf_counter is exact."""

    def __init__(self, use_events):
        self.use_events, self.marks = use_events, []

    def _now(self):
        if not self.use_events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase):
        self.marks.append((phase, self._now()))

    def restart(self):
        """Forget everything since the last mark: evals and checkpoints are not training time."""
        self.marks = [('start', self._now())]

    def fractions(self):
        """{phase: share of the measured time} since the last call, and start over."""
        if self.use_events and self.marks:
            self.marks[-1][1].synchronize()
        totals = {}
        for (_, t0), (phase, t1) in zip(self.marks, self.marks[1:]):
            seconds = t0.elapsed_time(t1) / 1e3 if self.use_events else t1 - t0
            totals[phase] = totals.get(phase, 0.0) + seconds
        self.marks = self.marks[-1:]
        total = sum(totals.values()) or 1.0
        return {phase: t / total for phase, t in totals.items()}


def memory_mb(on_gpu):
    """This rank's memory: GPU peak allocated and reserved (MB) and the process's resident set (current and
    peak)."""
    rss = psutil.Process().memory_info().rss
    peak_rss = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    gpu = {'gpu_alloc_mb': torch.cuda.max_memory_allocated() / 2**20,
           'gpu_reserved_mb': torch.cuda.max_memory_reserved() / 2**20} if on_gpu else {}
    return {**gpu, 'rss_mb': rss / 2**20, 'peak_rss_mb': peak_rss / 2**20}


def write_run_json(out_dir, info):
    """out_dir/run.json: what this start ran with, and on what. A resumed run keeps the earlier ones as
    run.<n>.json."""
    versions = {'python': sys.version.split()[0]}
    for package in ('torch', 'deepspeed', 'transformers', 'numpy'):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    def git(*args):
        return subprocess.run(['git', '-C', PROJECT, *args], capture_output=True, text=True).stdout.strip()

    try:
        commit = git('rev-parse', 'HEAD') or None
        dirty = bool(git('status', '--porcelain', '--untracked-files=no')) if commit else None
    except OSError:  # no git on this machine
        commit, dirty = None, None
    path = os.path.join(out_dir, 'run.json')
    if os.path.exists(path):
        n = 1
        while os.path.exists(os.path.join(out_dir, f'run.{n}.json')):
            n += 1
        os.replace(path, os.path.join(out_dir, f'run.{n}.json'))
    with open(path, 'w') as f:
        json.dump({**info, 'versions': versions, 'git_commit': commit, 'git_dirty': dirty,
                   'started': time.strftime('%Y-%m-%dT%H:%M:%S%z')}, f, indent=1, default=str)


class MetricsLog:
    """log(record): a line of out_dir/metrics.jsonl, and the same figures to wandb (project given) and
    tensorboard, with the iter as their step. Rank 0 writes; on the other ranks it does nothing."""

    def __init__(self, out_dir, config, wandb_project, wandb_run_name, tensorboard_log, wandb_run_id, active):
        self.path, self.wandb_run, self.tb_writer = os.path.join(out_dir, 'metrics.jsonl'), None, None
        self.active = active
        if active and wandb_project:
            import wandb
            self.wandb_run = wandb.init(project=wandb_project, name=wandb_run_name or None, config=config,
                                        dir=out_dir, id=wandb_run_id, resume='allow')
        if active and tensorboard_log:
            from torch.utils.tensorboard import SummaryWriter
            self.tb_writer = SummaryWriter(os.path.join(out_dir, 'tensorboard'))

    @property
    def wandb_run_id(self):
        return self.wandb_run.id if self.wandb_run else None

    def __call__(self, record):
        if not self.active:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        values = {k: v for k, v in record.items() if k != 'iter'}
        if self.wandb_run:
            self.wandb_run.log(values, step=record['iter'])
        if self.tb_writer:
            for k, v in values.items():
                self.tb_writer.add_scalar(k, v, record['iter'])

    def close(self):
        if self.wandb_run:
            self.wandb_run.finish()
        if self.tb_writer:
            self.tb_writer.close()


class StepMeter:
    """The figures of a training log line beyond loss and lr: tokens/s, MFU, the memory of the rank closest to
    running out, where the time went, and fp16's loss scale. MFU is model FLOPs per token (model.py, 6N plus
    attention) x tokens/s over the peak of every device in the run. Collective: every rank makes one and
    calls record() at the same iterations."""

    def __init__(self, model, block_size, micro_batch, tokens_per_iter, given_peak, dtype, on_gpu, local_rank,
                 time_phases):
        start_peak_mb = memory_mb(False)['peak_rss_mb']  # what the start needed (before CPU matmul timing)
        shape = dataclasses.replace(model.config, block_size=block_size)  # a resumed model may know more
        self.recomputes = model.gradient_checkpointing  # FLOPs it spends that MFU does not count
        self.flops_per_token = flops_per_token(shape)
        self.tokens_per_iter, self.dtype, self.on_gpu = tokens_per_iter, dtype, on_gpu
        self.world_size = dist.get_world_size()
        name = torch.cuda.get_device_name(local_rank) if on_gpu else f'cpu, {torch.get_num_threads()} threads'
        gemms = model_gemms(micro_batch * block_size, shape.n_embd, shape.vocab_size)
        self.peak, self.peak_source = device_peak_flops(given_peak, dtype, name if on_gpu else None, gemms)
        # every rank's host and device, and the host memory its start needed (model_init.py)
        start = [None] * self.world_size
        dist.all_gather_object(start, (f'{socket.gethostname()}: {name}', start_peak_mb))
        self.devices = [device for device, _ in start]
        self.start_peak_rss_mb = [round(peak_mb, 1) for _, peak_mb in start]
        self.timer = PhaseTimer(use_events=on_gpu) if time_phases else None
        self.said_why_no_mfu = False
        self.grad_norm = None  # taken by take_grad_norm where DeepSpeed keeps none

    def take_grad_norm(self, engine):
        """Between the last backward of an iteration and its step: where DeepSpeed keeps no gradient norm
        (ZeRO-0 in fp32, whose clipping drops the norm it computes), the norm of the averaged gradients, on
        the device (no host sync). Elsewhere record() reads DeepSpeed's own, get_global_grad_norm."""
        deepspeed_keeps_it = engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()
        if not deepspeed_keeps_it:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            self.grad_norm = torch.nn.utils.get_total_norm(grads)

    def mark(self, phase):
        if self.timer:
            self.timer.mark(phase)

    def restart(self):
        if self.timer:
            self.timer.restart()

    def run_info(self):
        """What run.json keeps of the meter: every rank's device and start's host memory peak, the FLOPs per
        token and the peak FLOP/s."""
        return dict(devices=self.devices, start_peak_rss_mb=self.start_peak_rss_mb,
                    flops_per_token=self.flops_per_token, peak_flops=self.peak, peak_source=self.peak_source)

    def start_lines(self):
        """For the start of the run: what MFU is measured against, and the host memory the start needed (a
        host needs that times its ranks)."""
        memory = (f'host memory at start: {max(self.start_peak_rss_mb) / 1024:.2f} GiB peak resident on the '
                  f'fullest of {self.world_size} rank(s) (weights, engine, runtime)')
        if not self.peak:
            return (f'MFU not shown: no peak known for {self.devices[0]} in {self.dtype}; give '
                    f'--peak_flops=<FLOP/s of one device>\n{memory}')
        line = f'MFU against {self.peak / 1e12:.3g} TFLOP/s per device ({self.peak_source}, {self.dtype})'
        if self.recomputes:
            line += "; model FLOPs only: gradient checkpointing's recomputation is not counted"
        return f'{line}\n{memory}'

    def record(self, iter_num, loss, lr, dt_ms, engine):
        """(metrics record, a line to say once or ''). Collective: the memory figures are the top rank's."""
        tokens_per_s = self.tokens_per_iter / (dt_ms / 1000)
        record = {'iter': iter_num, 'loss': loss, 'lr': lr, 'dt_ms': dt_ms, 'tokens_per_s': tokens_per_s}
        grad_norm = engine.get_global_grad_norm()  # before clipping, of the iteration's step
        if grad_norm is None:
            grad_norm = self.grad_norm
        if grad_norm is not None:
            record['grad_norm'] = float(grad_norm)
        share, why_no_mfu = mfu(self.flops_per_token * tokens_per_s, self.world_size, self.peak)
        if share is not None:
            record['mfu'] = share
        memory = memory_mb(self.on_gpu)
        device = torch.cuda.current_device() if self.on_gpu else 'cpu'  # NCCL reduces GPU tensors only
        highest = torch.tensor(list(memory.values()), dtype=torch.float64, device=device)
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)  # the rank closest to running out is what matters
        record.update(zip(memory, highest.tolist()))
        if engine.fp16_enabled():
            record.update(loss_scale=engine.optimizer.cur_scale, skipped_steps=engine.skipped_steps)
        if self.timer:
            record.update({f'{phase}_frac': part for phase, part in self.timer.fractions().items()})
        say = ''
        if why_no_mfu and not self.said_why_no_mfu:
            say, self.said_why_no_mfu = why_no_mfu, True
        return record, say
