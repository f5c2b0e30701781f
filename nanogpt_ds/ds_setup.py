"""
DeepSpeed set-up that the trainer needs but a reader of its loop does not: the process's environment, its
share of the cores and its heap, resolving the JSON config against the script's constants, the precision this
device computes well, starting the process group with two fixes for DeepSpeed's CPU backend, and the one way a
run stops on a user error.
"""
import ctypes
import faulthandler
import json
import os
import signal
import socket
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from model import Block, GPTConfig
from nanogpt_ds import PROJECT
from nanogpt_ds.ds_keys import refuse_unread
from nanogpt_ds.perf import matmul_flops
from nanogpt_ds.settings import DTYPES

# a bf16 step also keeps fp32 master weights and converts them: its block must be this much faster than fp32's
# to pay for the optimizer step and the head
BF16_PAYS_FROM = 1.5
# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# how long a rank waits for the others at start: nodes started one by one, weights downloaded, ops built (the
# loop then waits dist_timeout_s: preemption.stop_on_a_lost_rank)
START_TIMEOUT_S = 600
# warnings a library raises about its own calls into another library, which a user of ours cannot act on:
# (category, the start of the message). DeepSpeed's ZeRO calls torch.distributed's all_gather_into_tensor and
# reduce_scatter_tensor, which torch 2.13 deprecates. A warning the user can act on still shows.
LIBRARY_WARNINGS = [
    (FutureWarning, r'`torch\.distributed\.[\w.]+` (is|will be) '),
]


def cpu_bf16_native():
    """Whether this CPU has bf16 kernels (AVX512-BF16 or AMX, as oneDNN sees it). Where it has not, torch
    emulates bf16, about 60x slower than fp32 (an AVX2 EPYC: 1.2 vs 74 GFLOP/s). ONEDNN_MAX_CPU_ISA=AVX2
    with ATEN_CPU_CAPABILITY=avx2 makes a newer CPU answer, and compute, as an AVX2 one does."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_dtype(dtype, on_gpu, gpu_major=0, bf16_native=False, planning_gpus=False, bf16_speedup=0.0):
    """(dtype, why) for dtype='auto'; an explicit dtype is kept (why: ''). GPUs: bf16 from Ampere (compute
    capability 8) on, fp16 before. CPUs: fp32 where bf16 is emulated; where it is native, bf16 only if its
    block at the model's shape is clearly faster than fp32's (bf16_speedup, measured: 0.0 until then).
    Native is not enough: the demo's model ran 1.4x slower in bf16 on a Xeon with AVX512-BF16 and no AMX,
    and 1.25x slower on one with AMX, while gpt2's block runs 2.8x faster there. A dry run planning GPUs
    from a machine without one plans bf16."""
    if dtype != 'auto':
        return dtype, ''
    if planning_gpus and not on_gpu:
        return 'bfloat16', 'planning GPUs from a machine without one: bf16, as from Ampere on (fp16 before)'
    if on_gpu:
        if gpu_major >= 8:
            return 'bfloat16', f'the GPU has compute capability {gpu_major}.x (bf16 from 8.0, Ampere, on)'
        return 'float16', f'the GPU has compute capability {gpu_major}.x, before bf16 (8.0, Ampere)'
    if not bf16_native:
        capability = torch.backends.cpu.get_cpu_capability()
        why = f'this CPU ({capability}) has no bf16 kernels: bf16 would be emulated, 10-60x slower'
        return 'float32', why
    speed = f"a block of this model runs {bf16_speedup:.2f}x as fast in bf16 as in fp32 on this CPU"
    if bf16_speedup >= BF16_PAYS_FROM:
        return 'bfloat16', speed
    if not bf16_speedup:
        return 'float32', "until bf16 is timed at the model's shape"
    return 'float32', f'{speed}, below {BF16_PAYS_FROM}x'


def bf16_speedup(shape, micro_batch, collective):
    """How much faster one transformer block of the model's shape (model.GPTConfig) runs forward and backward
    in bf16 than in fp32 on this CPU. A block, not a matmul: the demo's small model has a bf16 matmul 5x
    faster than fp32's on a Xeon with AMX, and a block 0.73x as fast (its layer norms, softmax and
    conversions). The micro batch is cut to about 2e10 FLOPs, so gpt2-xl's block takes a second, not ten.
    Collective (every rank times, all take the mean) so that every rank picks the same dtype."""
    flops_per_token = 6 * 12 * shape.n_embd ** 2  # forward and backward of a block's four matmuls
    tokens = min(micro_batch * shape.block_size, max(64, int(2e10 / flops_per_token)))
    seq_len = min(shape.block_size, tokens)
    block_shape = GPTConfig(n_layer=1, n_head=shape.n_head, n_embd=shape.n_embd, block_size=seq_len,
                            bias=shape.bias, dropout=0.0)
    seconds_per_step = []
    with torch.random.fork_rng():  # the run's own random stream is left as it was
        for dtype in (torch.bfloat16, torch.float32):
            block = Block(block_shape).to(dtype)
            x = torch.randn(tokens // seq_len, seq_len, shape.n_embd, dtype=dtype, requires_grad=True)
            block(x).float().square().mean().backward()  # warm up
            steps, t0 = 0, time.perf_counter()
            while steps == 0 or time.perf_counter() - t0 < 0.1:
                block(x).float().square().mean().backward()
                steps += 1
            seconds_per_step.append((time.perf_counter() - t0) / steps)
    speeds = torch.tensor([1 / s for s in seconds_per_step], dtype=torch.float64)
    if collective:
        dist.all_reduce(speeds)
    return (speeds[0] / speeds[1]).item()


def resolve_dtype(config, on_gpu, local_rank):
    """(dtype, why, time_bf16) for the settings' dtype: 'auto' resolved by device (why says how; '' when dtype
    was given), ValueError for one that cannot run here. time_bf16: a CPU with bf16 kernels runs fp32 until
    settle_cpu_dtype has timed bf16 on the model. An explicit bf16 that this CPU emulates gets a warning."""
    dtype, dry_run = config['dtype'], config['dry_run']
    planning_gpus = dry_run and (config['plan_gpus'] > 0 or config['plan_gpu_mem_gb'] > 0)
    gpu_major = torch.cuda.get_device_capability(local_rank)[0] if on_gpu else 0
    bf16_native = not on_gpu and cpu_bf16_native()
    time_bf16 = dtype == 'auto' and bf16_native and not planning_gpus
    dtype, why = choose_dtype(dtype, on_gpu, gpu_major, bf16_native, planning_gpus)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use 'float32', 'bfloat16', 'float16' or 'auto'")
    if dtype == 'float16' and not on_gpu and not dry_run:  # planning for GPUs elsewhere may name it
        raise ValueError("dtype='float16' needs a GPU (DeepSpeed has no fp16 on CPU): use --dtype=bfloat16 "
                         "or --dtype=float32")
    emulated_bf16 = dtype == 'bfloat16' and not on_gpu and not bf16_native
    if emulated_bf16 and not dry_run and os.environ['RANK'] == '0':
        print(emulated_bf16_warning(), file=sys.stderr, flush=True)
    return dtype, why, time_bf16


def resolve_compile(compile, on_gpu, stage):
    """(compile, a line for rank 0 to print or ''): 'auto' resolved, an explicit True or False kept. On with
    GPUs under ZeRO 0-2, where the model compiles into one graph (nanoGPT reports 250 -> 135 ms/iter for gpt2
    on A100s). Off under ZeRO-3, whose parameter gathers break the graph at every module (41 breaks a rank for
    2 layers on CPU), and off on CPU, where the demo's model gained nothing for its compilation
    (docs/performance.md). A run that does not compile tells torch so (TORCHDYNAMO_DISABLE): DeepSpeed's
    ZeRO imports Muon's optimizer to check ours, and that import applies torch.compile to Muon's kernels,
    1.2 s of every rank's start (2.3 s with two ranks on two cores) for a decorator this run never uses."""
    if compile == 'auto':
        compile = on_gpu and stage < 3
    if not compile:
        os.environ['TORCHDYNAMO_DISABLE'] = '1'
        return False, ''
    return True, 'compile: on; the first iteration and the first eval also compile the model (torch.compile)'


def settle_cpu_dtype(shape, micro_batch, saved, ds_config):
    """(dtype, why) for dtype='auto' on a CPU with bf16 kernels, once the model's shape is known, and
    ds_config set to it: a resumed run keeps its checkpoint's dtype (a measurement near the bar could flip
    it); otherwise every rank times a block in bf16 and fp32 and they agree on the mean. Collective."""
    if saved and saved['dtype']:
        dtype, why = saved['dtype'], f"{saved['dir']} was trained in it"
    else:
        dtype, why = choose_dtype('auto', False, 0, True, False, bf16_speedup(shape, micro_batch, True))
    ds_config['bf16']['enabled'] = dtype == 'bfloat16'  # (never float16: a CPU has none)
    return dtype, why


def nonfinite_fix(dtype):
    """What to try after a NaN/inf loss in this precision."""
    fix = 'a lower --learning_rate'
    if dtype == 'bfloat16':
        fix += ' or --dtype=float32'
    if dtype == 'float16':
        fix += ' or --dtype=bfloat16'
    return fix


def emulated_bf16_warning():
    """The warning for an explicit bf16 on a CPU that emulates it, with the slowdown measured here."""
    fp32, bf16 = matmul_flops('float32', seconds=0.2), matmul_flops('bfloat16', seconds=0.2)
    capability = torch.backends.cpu.get_cpu_capability()
    return (f'warning: dtype=bfloat16 on a CPU ({capability}) without bf16 kernels: a bf16 matmul runs '
            f'{fp32 / bf16:.0f}x slower than fp32 here ({bf16 / 1e9:.1f} vs {fp32 / 1e9:.1f} GFLOP/s); '
            f'--dtype=auto picks float32')


def resolve_ds_config(path, batch_size, gradient_accumulation_steps, world_size, grad_clip, dtype):
    """(ds_config, zero stage). The JSON gives the ZeRO settings; batch, clipping and precision come from the
    script's constants, so that one place rules: values the JSON states must agree, or ValueError says how.
    A setting its stage would not read is refused too (ds_keys.py)."""
    if not os.path.isfile(path):  # a bare name also finds the JSONs that ship with the project
        if not os.path.isfile(os.path.join(PROJECT, path)):
            shipped = sorted(f for f in os.listdir(PROJECT)
                             if f.startswith('ds_config') and f.endswith('.json'))
            raise ValueError(f'DeepSpeed config {path} not found: give the path of a JSON, or one that ships '
                             f"here ({', '.join(shipped)}), as --deepspeed_config=...")
        path = os.path.join(PROJECT, path)
    try:
        with open(path) as f:
            ds_config = json.load(f)
    except OSError as e:
        raise ValueError(f'cannot read DeepSpeed config {path}: {e.strerror}: make it readable or give '
                         f'another one')
    except json.JSONDecodeError as e:
        raise ValueError(f'DeepSpeed config {path} is not valid JSON: {e.msg} at line {e.lineno} column '
                         f'{e.colno}: fix it there (python -m json.tool {path} shows where)')
    if not isinstance(ds_config, dict) or not isinstance(ds_config.get('zero_optimization', {}), dict):
        raise ValueError(f'DeepSpeed config {path} must be a JSON object whose "zero_optimization" is an '
                         f'object too, like ds_config_zero2.json: rewrite it after that one')
    accumulation = gradient_accumulation_steps
    batch = {'train_micro_batch_size_per_gpu': batch_size, 'gradient_accumulation_steps': accumulation,
             'train_batch_size': batch_size * accumulation * world_size}
    stated = {k: ds_config.get(k, 'auto') for k in batch}
    disagree = [k for k, v in stated.items() if v != 'auto' and v != batch[k]]
    if disagree:
        raise ValueError(
            f"{path} says train_batch_size={stated['train_batch_size']}, micro batch="
            f"{stated['train_micro_batch_size_per_gpu']}, "
            f"gradient_accumulation_steps={stated['gradient_accumulation_steps']}, "
            f'but train_batch_size must be micro batch x accumulation x world size = {batch_size} x '
            f'{accumulation} x {world_size} = {batch["train_batch_size"]}: set the three to "auto" '
            f'in the JSON and choose --batch_size / --gradient_accumulation_steps here')
    if ds_config.get('gradient_clipping', 'auto') not in ('auto', grad_clip):
        raise ValueError(f"{path} says gradient_clipping={ds_config['gradient_clipping']}, "
                         f'grad_clip={grad_clip}: set it to "auto" in the JSON and use --grad_clip')
    for block, wanted in (('fp16', dtype == 'float16'), ('bf16', dtype == 'bfloat16')):
        ds_config.setdefault(block, {})
        if ds_config[block].get('enabled', 'auto') not in ('auto', wanted):
            raise ValueError(f'{path} has {block}.enabled={ds_config[block]["enabled"]} but dtype={dtype}: '
                             f'set it to "auto" in the JSON and choose --dtype here')
        ds_config[block]['enabled'] = wanted
    ds_config.update(batch, gradient_clipping=grad_clip)
    stage = ds_config.get('zero_optimization', {}).get('stage', 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise ValueError(f'{path}: zero_optimization.stage={stage!r}, but DeepSpeed has only ZeRO stages '
                         f'0-3: set "stage" to 0, 1, 2 or 3 there (ds_config_zero2.json and '
                         f'ds_config_zero3.json ship ready)')
    refuse_unread(ds_config, stage, path)  # a setting this stage never reads, or one DeepSpeed does not know
    return ds_config, stage


def offload_of(ds_config):
    """What a DeepSpeed JSON (or its zero_optimization block) puts on the CPU: 'none', 'optimizer' or
    'optimizer+params' (memory_plan.OFFLOADS). With the optimizer there, DeepSpeed's CPU Adam steps it:
    DeepSpeed refuses a torch optimizer there."""
    zero = ds_config.get('zero_optimization', ds_config)

    def on_cpu(key):
        return zero.get(key, {}).get('device', 'none') not in ('none', None)
    if on_cpu('offload_param'):
        return 'optimizer+params'
    return 'optimizer' if on_cpu('offload_optimizer') else 'none'


def prepare_process():
    """The environment a rank needs before DeepSpeed loads (it picks its accelerator on import). Plain `python
    train_deepspeed.py` becomes a world of one on a free port; CPU ranks take their share of the cores."""
    if 'RANK' not in os.environ:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1',
                              MASTER_ADDR='127.0.0.1', MASTER_PORT=str(s.getsockname()[1]))
    os.environ.setdefault('DS_ACCELERATOR', 'cuda' if torch.cuda.is_available() else 'cpu')
    if os.environ['DS_ACCELERATOR'] == 'cpu':
        share_cpu_cores()
    # DeepSpeed builds its CPU comm op with the first ninja on PATH. pip's ninja in the venv and the system's
    # differ in version, and each takes the other's build for stale: 22 s of rebuilding at every switch
    os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
    # under one name for every venv: two clones' venvs took each other's build for stale too. So in a venv
    # the build goes beside it (removing .venv removes it); elsewhere where torch puts it
    in_a_venv = sys.prefix != sys.base_prefix
    if in_a_venv:
        os.environ.setdefault('TORCH_EXTENSIONS_DIR', os.path.join(sys.prefix, 'torch_extensions'))
    if os.environ['RANK'] != '0':  # one progress bar, rank 0's: another's half-drawn bar swallowed an error
        os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'  # transformers' bars follow the hub's
    # a run that seems stuck: `kill -USR1 <a rank's pid>` prints where each of its threads is, and it goes on
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category)


def share_cpu_cores():
    """Each CPU rank on this host takes its share of the cores as threads, unless OMP_NUM_THREADS says. Two
    ranks of two threads on two cores spin in each other's OpenMP barriers: matmuls at 1% of their speed, now
    and then."""
    if 'OMP_NUM_THREADS' in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_this_host(1)))


def ranks_on_this_host(default):
    """The ranks its launcher started on this host: DeepSpeed's launch.py says LOCAL_SIZE, torchrun
    LOCAL_WORLD_SIZE; default where neither launched this process."""
    return int(os.environ.get('LOCAL_SIZE') or os.environ.get('LOCAL_WORLD_SIZE') or default)


def set_malloc(mmap_threshold_b, trim_threshold_b=None):
    """glibc malloc's two thresholds: a block of mmap_threshold_b bytes or more gets a mapping of its own,
    returned to the system when freed, and free memory beyond trim_threshold_b at the heap's top is returned
    (None: left as it is). Setting either turns off glibc's own adjustment, which ends at 32 MiB and 64 MiB.
    Nothing where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_b)
    if trim_threshold_b is not None:
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold_b)


def init_distributed(backend, on_gpu, settings):
    """deepspeed.init_distributed, and (rank, world size). ValueError when the ranks do not all start within
    START_TIMEOUT_S, or when one was started with other settings than rank 0 (nodes launched one by one)."""
    import deepspeed  # here: the trainer stops on a bad setting before DeepSpeed loads (2 s)
    if not on_gpu:
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce for tensor-parallel inference
        # (dist.inference_all_reduce), which training never calls: 30 s of C++ on a new machine, a lock file
        # that hangs every later start when a build is killed, 66 MB of /dev/shm per rank it never frees.
        # Marked incompatible, it is not built (deepspeed/comm/torch.py, build_shm_op).
        deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] = False
    master_addr, master_port = os.environ.get('MASTER_ADDR', ''), os.environ.get('MASTER_PORT', '')
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=START_TIMEOUT_S))
    except (RuntimeError, dist.DistError) as e:  # the rendezvous timed out, or its address is wrong
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        world = os.environ.get('WORLD_SIZE')
        raise ValueError(f'the {world} ranks did not meet at {master_addr}:{master_port} ({reason}): start '
                         f'every node within {START_TIMEOUT_S} s with the same hostfile, --master_addr and '
                         f'--master_port') from None
    rank = dist.get_rank()
    check_same_settings(settings)
    return rank, dist.get_world_size()


def check_same_settings(settings):
    """Collective: ValueError when a rank was started with other settings than rank 0's. Nodes launched one by
    one (--no_ssh) each read their own command line and config files."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), settings))
    _, ours = everyone[0]
    for host, theirs in everyone[1:]:
        differ = [key for key in ours if theirs.get(key) != ours[key]]
        if differ:
            shown = ', '.join(f'{key}={theirs[key]!r} there, {ours[key]!r} on rank 0' for key in differ[:3])
            raise ValueError(f'{host} was started with other settings than rank 0 ({shown}): give every node '
                             f'the same command line and config files')


def start_engine(model, optimizer, ds_config, stage, dtype, device):
    """(engine, its optimizer): deepspeed.initialize. Without an optimizer (an evaluation that loads no
    checkpoint), ZeRO-3 still partitions the weights (DeepSpeed's engine without one gathers each layer as
    it runs), but ZeRO 0-2 would only split what an optimizer holds: there the model itself in the run's
    precision is the engine (DeepSpeed refuses ZeRO-1/2 without an optimizer, and its bf16 path makes an fp32
    copy of every weight for one)."""
    import deepspeed
    if device == 'cpu':
        # each step frees its activations and allocates them again: glibc gave the heap's free top back to
        # the system (above 64 MiB) and the next step faulted the same pages in anew, 16,600 a step on issue
        # 23's shape, 19 now. Kept, a rank stays at a step's peak, which the next step needs anyway (its peak
        # was no higher). On a 2-core AVX2 EPYC the time moved within noise (docs/performance.md, "Against
        # nanoGPT"): the faults are kernel work a faster CPU feels more. A GPU's activations are elsewhere
        set_malloc(32 * 2**20, 2**31 - 1)
    if optimizer is None and stage < 3:
        return model.to(device, getattr(torch, dtype)), None
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def use_device(accelerator, local_rank, on_gpu, mem_cap_gb=0.0):
    """This rank's device: its GPU (TF32 matmuls allowed, as nanoGPT does), or 'cpu'. mem_cap_gb > 0: the
    process may allocate only that much of the GPU (torch.cuda.set_per_process_memory_fraction), a smaller
    card rehearsed on a bigger one. ValueError for a cap without a GPU or beyond it."""
    if not on_gpu:
        if mem_cap_gb:
            raise ValueError(f'gpu_mem_cap_gb={mem_cap_gb} caps a GPU, and this run has none: drop it (a dry '
                             f'run plans for a card of that size with --plan_gpu_mem_gb={mem_cap_gb:g})')
        return 'cpu'
    accelerator.set_device(local_rank)
    if mem_cap_gb:
        total_gib = torch.cuda.get_device_properties(local_rank).total_memory / 2**30
        if mem_cap_gb > total_gib:
            raise ValueError(f'gpu_mem_cap_gb={mem_cap_gb} is more than this GPU has ({total_gib:.1f} GiB): '
                             f'use --gpu_mem_cap_gb={int(total_gib)} or less')
        torch.cuda.set_per_process_memory_fraction(mem_cap_gb / total_gib, local_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return accelerator.device_name(local_rank)


def exit_cleanly():
    """End a finished rank. gloo can abort at interpreter exit ('terminate called without an active
    exception') after the work is done, failing the launcher at random: leave the process group, flush, and
    exit at once instead. Collective."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
