"""
Fine-tune (or train from scratch) a GPT-2 with DeepSpeed ZeRO, nanoGPT style.

The defaults are the headline run, gpt2-xl on Shakespeare with ZeRO-2 on 4 GPUs:
$ deepspeed --num_gpus 4 train_deepspeed.py
Pick GPUs (DeepSpeed's launcher ignores CUDA_VISIBLE_DEVICES; run_deepspeed_xl.sh translates it):
$ deepspeed --include localhost:0,1 train_deepspeed.py config/train_gpt2_xl_shakespeare.py
No GPU: the same code on 2 CPU ranks over gloo (after python data/shakespeare_char/prepare.py):
$ deepspeed --num_gpus 2 train_deepspeed.py config/train_shakespeare_char_cpu.py
Resume from the newest checkpoint, or from a tag:
$ deepspeed --num_gpus 4 train_deepspeed.py --init_from=resume [--resume_tag=iter_10]
"""
import filecmp
import math
import os
import shutil
import socket
import sys
import time

import numpy as np
import torch

import checkpoints
import data_sources

from model import GPT, GPTConfig, PRETRAINED_SHAPES, flops_per_token, is_pretrained_source
from perf import MetricsLog, PhaseTimer, device_peak_flops, log_line, memory_mb, mfu, model_gemms
from perf import write_run_json
from preemption import StopFlag

# -----------------------------------------------------------------------------
# defaults: gpt2-xl on Shakespeare, 4x V100-32GB, ZeRO-2 fp16 (~303 ms/iter, 15-16 GB per GPU)
# I/O
out_dir = 'out-shakespeare-xl-deepspeed'
eval_interval = 5  # iters between evals (and checkpoint chances)
log_interval = 1  # iters between log lines; the only host syncs in the loop happen here
progress = True  # a tqdm bar on rank 0 when stdout is a terminal (plain log lines otherwise)
time_phases = True  # data/forward/backward/step shares in each log line (GPU events: no extra host sync)
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0: perf.py's table (GPU) or a matmul timed at start (CPU)
wandb_log = False  # also log to Weights & Biases (WANDB_MODE=offline works without a network)
wandb_project = 'nanogpt-deepspeed'
wandb_run_name = ''  # empty: wandb picks one; a resumed run continues its checkpoint's wandb run
tensorboard_log = False  # also log to out_dir/tensorboard
plot = False  # at the end, draw out_dir/loss.png (plot.py)
# dry run: plain `python train_deepspeed.py ... --dry_run=True`; builds nothing, loads no weights, writes nothing
dry_run = False  # print the batch, the parameter count and the memory plan per GPU for ZeRO 0-3, then exit
plan_gpus = 0  # plan for this many GPUs (0: the launcher's world size)
plan_gpu_mem_gb = 0.0  # GiB per GPU to fit in (0: the visible GPU's); gives a recommended stage and micro batch
eval_iters = 20  # batches per split per rank at each eval
eval_only = False  # evaluate once, print every rank's view of the result, exit
always_save_checkpoint = False  # save at every eval, not only when val loss improves
keep_last_n = 2  # iter_* checkpoints kept; the best-val one and 'final' are kept besides
min_free_disk_mb = 100  # a save first checks for one checkpoint's size plus this much free, else the run stops
early_stop_patience = 0  # evals in a row without a better val loss that end the run (with a final save); 0: never
max_nonfinite = 3  # iterations in a row with a NaN/inf loss that stop the run (nothing more is saved)
init_from = 'gpt2-xl'  # 'scratch', 'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a transformers folder
resume_tag = ''  # with init_from='resume': a tag like 'iter_10'; empty means the one named in out_dir/latest
# data
dataset = 'shakespeare'  # data/<dataset>/{train,val}.bin (uint16 token ids), a folder path, or a mix {name: weight}
gradient_accumulation_steps = 32  # micro steps per optimizer step, per rank
batch_size = 1  # micro batch per GPU (DeepSpeed's train_micro_batch_size_per_gpu)
block_size = 1024  # tokens per sample
# model, for init_from='scratch' (pretrained and resumed runs take the checkpoint's shape)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining; try 0.1+ when fine-tuning small data for long
bias = True  # biases in Linear and LayerNorm, as in GPT-2
# AdamW
learning_rate = 3e-5  # peak; 3e-5 suits fine-tuning gpt2-xl, 1e-3 a small model from scratch
max_iters = 20  # optimizer steps in all (a resumed run goes on up to this)
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # DeepSpeed's gradient_clipping; 0.0 disables
# learning rate schedule: linear warmup, then cosine down to min_lr
decay_lr = True  # False: constant learning_rate after warmup
warmup_iters = 2
lr_decay_iters = 20  # usually max_iters
min_lr = 3e-6  # usually learning_rate / 10
# system
deepspeed_config = 'ds_config_zero2.json'  # ZeRO settings; batch, clipping and precision come from here
dtype = 'auto'  # 'float32', 'bfloat16', 'float16', 'auto': bf16 from Ampere (fp16 before); CPU: where it pays
seed = 1337
sample_max_new_tokens = 0  # > 0: print a sample of this many tokens at the end
sample_start = '\n'
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402

config_keys, overrides = configure(globals(), dict_keys=('dataset',))
config = {k: globals()[k] for k in config_keys}  # the resolved settings, logged and checkpointed
# -----------------------------------------------------------------------------
import settings  # noqa: E402
from ds_setup import bf16_speedup, choose_dtype, cpu_bf16_native, die, emulated_bf16_warning  # noqa: E402
from ds_setup import init_distributed, prepare_process, resolve_ds_config, share_cpu_cores  # noqa: E402

bad_setting = settings.problem(config)  # before DeepSpeed loads: a wrong number costs a second, not five
if bad_setting:
    die(bad_setting)

prepare_process()  # a world of one for plain `python train_deepspeed.py`, as nanoGPT's train.py is

import deepspeed  # noqa: E402  (after the environment is set: it picks its accelerator on import)
import torch.distributed as dist  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

accelerator = get_accelerator()
on_gpu = accelerator.device_name() == 'cuda'
local_rank = int(os.environ['LOCAL_RANK'])
if not on_gpu:
    share_cpu_cores()  # the ranks on one host share its cores
gpu_major = torch.cuda.get_device_capability(local_rank)[0] if on_gpu else 0
bf16_native = not on_gpu and cpu_bf16_native()
planning_gpus = dry_run and (plan_gpus > 0 or plan_gpu_mem_gb > 0)
time_bf16 = dtype == 'auto' and bf16_native and not planning_gpus  # fp32 until bf16 is timed on the model
dtype, dtype_why = choose_dtype(dtype, on_gpu, gpu_major, bf16_native, planning_gpus)  # why: '' if given
config['dtype'] = dtype
if dtype not in ('float32', 'bfloat16', 'float16'):
    die(f"dtype={dtype!r}: use 'float32', 'bfloat16', 'float16' or 'auto'")
if dtype == 'float16' and not on_gpu and not dry_run:  # planning for GPUs elsewhere may name it
    die("dtype='float16' needs a GPU (DeepSpeed has no fp16 on CPU): use --dtype=bfloat16 or --dtype=float32")
emulated_bf16 = dtype == 'bfloat16' and not on_gpu and not bf16_native
if emulated_bf16 and not dry_run and os.environ['RANK'] == '0':
    print(emulated_bf16_warning(), file=sys.stderr, flush=True)

world_size = plan_gpus if dry_run and plan_gpus > 0 else int(os.environ['WORLD_SIZE'])
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
rank = int(os.environ['RANK'])
try:
    ds_config, stage = resolve_ds_config(deepspeed_config, batch_size, gradient_accumulation_steps, world_size,
                                         grad_clip, dtype)
except ValueError as e:
    die(str(e))
config['zero_stage'] = stage

if on_gpu:
    accelerator.set_device(local_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
device = accelerator.device_name(local_rank) if on_gpu else 'cpu'
torch.manual_seed(seed)  # the same on every rank: a scratch model starts identical everywhere

# -----------------------------------------------------------------------------
# data: random windows from a memmap; each rank draws from its own seeded generator
data_note = ''  # the dry run plans without data: what is missing is a note in the plan
try:
    sources = data_sources.resolve(dataset, block_size)  # {name: (folder, weight)}, every .bin checked
except ValueError as e:
    if not dry_run:
        die(str(e))
    sources, data_note = {}, f'note: no usable data ({e}); planned with the vocabulary of GPT-2'
source_names, source_weights = list(sources), [weight for _, weight in sources.values()]
batch_rng = np.random.default_rng([seed, rank])  # training batches (and a mix's sources); checkpointed


def get_batch(split, rng, source=None):
    if source is None:  # a mix draws each batch's dataset by weight; a single dataset draws nothing extra
        source = source_names[rng.choice(len(source_names), p=source_weights)] if len(sources) > 1 else source_names[0]
    # a new memmap per batch: a long-lived one keeps every page read resident (nanoGPT#151)
    data = np.memmap(os.path.join(sources[source][0], f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if on_gpu:
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


meta_path = ''  # a mix shares one vocabulary
if sources:
    meta_path = os.path.join(sources[source_names[0]][0], 'meta.pkl')
meta = data_sources.read_meta(meta_path)  # None: GPT-2 BPE
meta_vocab_size = meta['vocab_size'] if meta else None

scratch_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                    dropout=dropout, vocab_size=meta_vocab_size or 50304)  # 50304: 50257 padded to a multiple of 64

if dry_run:  # the plan from the shape alone (memory_plan.py): no weights, no process group, no data needed
    import memory_plan  # imports DeepSpeed's estimators: only after the environment above is set
    print(memory_plan.dry_run(config, scratch_args, ds_config, world_size, dtype_why, time_bf16, data_note, on_gpu))
    sys.stdout.flush()
    os._exit(0)

writable = checkpoints.existing_ancestor(out_dir)
if not os.path.isdir(writable) or not os.access(writable, os.W_OK | os.X_OK):
    die(f'out_dir={out_dir} cannot be written ({writable} is not a writable folder): choose another --out_dir')

if init_from == 'resume':  # files only: found out before the process group starts
    try:
        tag, load_tag = checkpoints.tag_to_resume(out_dir, resume_tag)  # load_tag: <tag>.old after a kill mid-swap
        tag_dir = os.path.join(out_dir, load_tag)
        saved = checkpoints.read_saved(tag_dir)
    except ValueError as e:
        die(str(e))

rank, world_size = init_distributed(accelerator.communication_backend_name(), on_gpu, local_rank)
master_process = rank == 0

# -----------------------------------------------------------------------------
# model
iter_num, best_val_loss, best_tag, evals_without_gain = 0, 1e9, None, 0
if init_from == 'resume':
    model_args, universal = saved['model_args'], saved['universal']  # universal: made by ds_to_universal
    problems = [None] * world_size  # each rank checks its own shards against the checksums of the save
    dist.all_gather_object(problems, checkpoints.verify_own_files(tag_dir, rank))
    if any(problems):
        die(f'{next(p for p in problems if p)}: the checkpoint is damaged; resume from another tag with --resume_tag '
            f"({', '.join(t for t in checkpoints.complete_tags(out_dir) if t != load_tag) or 'there is none'})")
    model = GPT(GPTConfig(**model_args))  # weights come from load_checkpoint below
elif init_from == 'scratch':
    model_args = scratch_args
    model = GPT(GPTConfig(**model_args))
elif is_pretrained_source(init_from):
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=dropout))
    except OSError as e:  # transformers' word for a hub it cannot reach, or a folder without weights
        reason = str(e).splitlines()[0][:160]
        die(f'the weights of {init_from} could not be loaded ({reason}): on a machine online, save them once '
            f"with GPT2LMHeadModel.from_pretrained('{init_from}').save_pretrained(DIR), then --init_from=DIR")
    if block_size > model.config.block_size:
        die(f'block_size={block_size} is more than {init_from} was trained for ({model.config.block_size}): '
            f'use --block_size={model.config.block_size} or less')
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
else:
    die(f"init_from={init_from!r} is none of 'scratch', 'resume', {', '.join(map(repr, PRETRAINED_SHAPES))} "
        f'nor a folder with a transformers config.json')
clash = [f'{k}={overrides[k]}' for k in ('n_layer', 'n_head', 'n_embd', 'bias')
         if init_from != 'scratch' and k in overrides and overrides[k] != getattr(model.config, k)]
if clash:
    die(f"{', '.join(clash)} disagrees with {init_from} (n_layer={model.config.n_layer}, n_head={model.config.n_head}, "
        f'n_embd={model.config.n_embd}, bias={model.config.bias}): a pretrained or resumed model keeps its shape; '
        f'drop the override or use --init_from=scratch')
torch.manual_seed(seed + rank)  # from here on (dropout) each rank draws its own numbers
if meta_vocab_size and model.config.vocab_size < meta_vocab_size:
    die(f'{dataset} has {meta_vocab_size} token ids, the model only {model.config.vocab_size}')
if block_size > model.config.block_size:
    die(f'block_size={block_size} is more than the checkpoint was trained with ({model.config.block_size})')
try:
    data_sources.check_token_ids(sources, model.config.vocab_size)
except ValueError as e:
    die(str(e))

# -----------------------------------------------------------------------------
if init_from == 'resume' and universal:
    ds_config['checkpoint'] = {**ds_config.get('checkpoint', {}), 'load_universal': True}
elif init_from == 'resume' and saved['stage'] > 0 and saved['world_size'] != world_size:
    die(f"{tag_dir} holds ZeRO-{saved['stage']} shards for {saved['world_size']} ranks, this run has {world_size}: "
        f'convert it once with `{sys.executable} -m deepspeed.checkpoint.ds_to_universal --inject_missing_state '
        f'--input_folder {tag_dir} --output_folder {tag_dir}_universal` and resume with --resume_tag={tag}_universal')

if time_bf16 and init_from == 'resume' and saved['dtype']:  # a measurement near the bar could flip it
    dtype, dtype_why = saved['dtype'], f'{tag_dir} was trained in it'
elif time_bf16:  # every rank times a block in bf16 and fp32 at the model's shape; they agree on the mean
    speedup = bf16_speedup(model.config, batch_size, collective=True)
    dtype, dtype_why = choose_dtype('auto', False, 0, True, False, speedup)
config['dtype'] = dtype
if time_bf16 and dtype == 'bfloat16':  # the JSON was resolved for the provisional fp32: once more for bf16
    try:
        ds_config, stage = resolve_ds_config(deepspeed_config, batch_size, gradient_accumulation_steps,
                                             world_size, grad_clip, dtype)
    except ValueError as e:
        die(str(e))

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
model_engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

if init_from == 'resume':
    try:
        load_path, client_state = model_engine.load_checkpoint(out_dir, tag=load_tag)
    except Exception as e:  # this rank's shard; the launcher stops the others
        load_path, reason = None, str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    else:
        reason = 'nothing found'  # DeepSpeed returns (None, None) for a folder it finds nothing in
    if load_path is None:
        die(f'DeepSpeed could not load {tag_dir} on rank {rank} ({reason}): resume from another tag with '
            f'--resume_tag', alone=True)
    iter_num, best_val_loss = client_state['iter_num'], client_state['best_val_loss']
    best_tag, evals_without_gain = client_state.get('best_tag'), client_state.get('evals_without_gain', 0)
    if len(client_state['rng_states']) == world_size:  # every rank continues its own random streams
        checkpoints.restore_rng_streams(client_state['rng_states'][rank], batch_rng)
    else:  # fresh streams, also new to each rank: continuing, but not what an unbroken run would have drawn
        batch_rng = np.random.default_rng([seed, rank, iter_num])
        torch.manual_seed(seed + rank + 1000 * iter_num)
        if master_process:
            print(f"note: {len(client_state['rng_states'])} ranks saved this checkpoint, {world_size} resume it: "
                  f'the weights and optimizer carry over, the batch order starts afresh')
resumed_at = iter_num if init_from == 'resume' else None

# MFU = model FLOPs per token (model.py, computed once) x tokens/s, over the peak of all devices in the run
model_flops_per_token = flops_per_token(GPTConfig(**{**model_args, 'block_size': block_size}))
device_name = torch.cuda.get_device_name(local_rank) if on_gpu else f'cpu, {torch.get_num_threads()} threads'
peak_flops, peak_source = device_peak_flops(peak_flops, dtype, device_name if on_gpu else None,
                                            model_gemms(batch_size * block_size, model.config.n_embd,
                                                        model.config.vocab_size))
devices = [None] * world_size
dist.all_gather_object(devices, f'{socket.gethostname()}: {device_name}')

if master_process:
    os.makedirs(out_dir, exist_ok=True)
    run_meta = os.path.join(out_dir, 'meta.pkl')  # the vocabulary travels with the run, for sample.py and export.py
    if os.path.exists(meta_path) and not (os.path.exists(run_meta) and filecmp.cmp(meta_path, run_meta, shallow=False)):
        shutil.copyfile(meta_path, run_meta)
    write_run_json(out_dir, dict(config=config, ds_config=ds_config, world_size=world_size, devices=devices,
                                 model_args=model_args, n_params=model.get_num_params(),
                                 flops_per_token=model_flops_per_token, peak_flops=peak_flops, peak_source=peak_source,
                                 resumed_at=resumed_at))
    print(f'{init_from} -> {model.get_num_params() / 1e6:.2f}M parameters; ZeRO-{stage}, {dtype}, {world_size} rank(s) on '
          f'{accelerator.device_name()} ({dist.get_backend()}); train_batch_size = {batch_size} x '
          f'{gradient_accumulation_steps} x {world_size} = {ds_config["train_batch_size"]} sequences, '
          f'{tokens_per_iter:,} tokens per iter' + (f'; resumed at iter {iter_num} from {tag_dir}' if resumed_at is not None else ''))
    if dtype_why:
        print(f'dtype auto -> {dtype}: {dtype_why}')
    if world_size == 1 and stage > 0:  # docs/performance.md: ZeRO-2 measured 0.89x the plain loop on one CPU rank
        print(f'note: ZeRO-{stage} on one rank partitions nothing and costs time; a JSON with "stage": 0 is faster')
    print(f'MFU against {peak_flops / 1e12:.3g} TFLOP/s per device ({peak_source}, {dtype})' if peak_flops else
          f'MFU not shown: no peak known for {devices[0]} in {dtype}; give --peak_flops=<FLOP/s of one device>')


# metrics.jsonl, and wandb / tensorboard when asked for; a resumed run continues its checkpoint's wandb run
log_record = MetricsLog(out_dir, config, wandb_project if wandb_log else None, wandb_run_name, tensorboard_log,
                        client_state.get('wandb_run_id') if resumed_at is not None else None, master_process)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """{'train_loss', 'val_loss'}: the mean loss over eval_iters batches per split on every rank, averaged across
    ranks; a mix has them per dataset too ('val_loss_<name>') and its weighted mean as 'val_loss'. The eval batches
    are the same at every eval (a fresh generator each time), so evals compare like for like."""
    model_engine.eval()
    means = {}
    for split_id, split in enumerate(('train', 'val')):
        for name in source_names:
            rng = np.random.default_rng([seed, rank, 1 + split_id])
            losses = torch.zeros(eval_iters, device=device)
            for k in range(eval_iters):
                X, Y = get_batch(split, rng, name)
                losses[k] = model_engine(X, Y)[1].float()
            means[split, name] = losses.mean()
    reduced = torch.stack(list(means.values()))
    dist.all_reduce(reduced)  # every rank must run this, or the others wait forever
    means = dict(zip(means, (reduced / world_size).tolist()))
    out = {f'{split}_loss': sum(means[split, name] * weight for name, (_, weight) in sources.items())
           for split in ('train', 'val')}
    if len(sources) > 1:
        out.update({f'{split}_loss_{name}': loss for (split, name), loss in means.items()})
    model_engine.train()
    return out


def save(tag):
    """Every rank writes its shards and their checksums, rank 0 also the client state with all ranks' RNG streams,
    into <tag>.partial; then rank 0 (and the first rank of a node with a disk of its own) swaps it in for an older
    <tag>, points 'latest' at it and removes the iter_* tags beyond keep_last_n. A kill at any moment, or a save by
    another number of ranks over an older tag, leaves 'latest' naming a complete folder."""
    shortfall = checkpoints.disk_shortfall(out_dir, model.get_num_params(), dtype, min_free_disk_mb) \
        if local_rank == 0 else ''
    gathered = [None] * world_size  # every rank's RNG streams, each node's free disk, each rank's last loss
    dist.all_gather_object(gathered, (checkpoints.rng_streams(batch_rng), shortfall, nonfinite_streak.item()))
    if any(short for _, short, _ in gathered):
        die(next(short for _, short, _ in gathered if short))
    if any(streak for _, _, streak in gathered):  # never a NaN state over a good one
        stop_nonfinite(f'at iter {iter_num - 1}, just before saving {tag}')
    client = dict(iter_num=iter_num, best_val_loss=best_val_loss, best_tag=best_tag,
                  evals_without_gain=evals_without_gain, config=config, model_args=model_args,
                  rng_states=[r for r, _, _ in gathered], wandb_run_id=log_record.wandb_run_id)
    tag_dir, partial = os.path.join(out_dir, tag), os.path.join(out_dir, tag + '.partial')
    if local_rank == 0 and os.path.isdir(partial):
        shutil.rmtree(partial, ignore_errors=True)  # the remains of a killed save
    dist.barrier()
    model_engine.save_checkpoint(out_dir, tag=tag + '.partial', client_state=client, save_latest=False)
    sums = [None] * world_size  # also the barrier: every shard is written before anyone moves the folder
    dist.all_gather_object(sums, checkpoints.checksum_own_files(partial, rank))
    if master_process:
        removed = checkpoints.put_in_place(partial, tag_dir, sums, keep_last_n, keep={tag, best_tag})
        print(f'saved checkpoint {tag_dir}' + (f" (removed {', '.join(removed)})" if removed else ''))
    dist.barrier()
    if local_rank == 0 and os.path.isdir(partial):  # a node whose out_dir is its own disk, not rank 0's
        checkpoints.put_in_place(partial, tag_dir, sums, keep_last_n, keep={tag, best_tag})
    dist.barrier()  # nobody reads or writes out_dir/<tag> before it is in place


# -----------------------------------------------------------------------------
# training loop. The batches for iter k are drawn after the eval and checkpoint at k, so a run resumed
# from iter_k draws exactly what the uninterrupted run drew.
t_log, iters_since_log = time.time(), 0
timer = PhaseTimer(use_events=on_gpu) if time_phases else None
mark = timer.mark if timer else (lambda phase: None)
bar = None
if master_process and progress and sys.stdout.isatty():
    from tqdm import tqdm
    bar = tqdm(total=max_iters, initial=iter_num, unit='iter', dynamic_ncols=True)
say = bar.write if bar else print  # log lines above the bar, not through it
stop_signal = StopFlag()  # the first SIGTERM/SIGINT: finish this step, save, exit 0; a second: exit at once
stop_group = dist.new_group(backend='gloo') if on_gpu else None  # the stop flag travels on the CPU: no GPU sync
nonfinite_streak = torch.zeros((), device=device)  # iterations in a row with a NaN/inf loss, kept on the device
nonfinite_worst = torch.zeros((), device=device)  # the longest such streak since the last log line


def stop_nonfinite(where):
    latest = os.path.join(out_dir, 'latest')
    kept = open(latest).read().strip() if os.path.isfile(latest) else None
    die(f'loss is NaN/inf {where} (lr {get_lr(iter_num):.3g}, {dtype}): stopped without saving; '
        + (f'the last checkpoint {kept} is untouched: resume from it with ' if kept else 'try ')
        + 'a lower --learning_rate'
        + {'float32': '', 'bfloat16': ' or --dtype=float32', 'float16': ' or --dtype=bfloat16'}[dtype])


preempted, said_why_no_mfu = False, False
while True:
    if eval_only or ((iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at):
        losses = estimate_loss()
        if eval_only:
            print(f"eval_only: rank {rank} of {world_size} has train loss {losses['train_loss']:.6f}, "
                  f"val loss {losses['val_loss']:.6f} (averaged over ranks)", flush=True)
            break
        if master_process:
            say(f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}" + ''.join(
                f", {k[len('val_loss_'):]} {v:.4f}" for k, v in losses.items() if k.startswith('val_loss_')))
        log_record({'iter': iter_num, **losses})
        if not all(map(math.isfinite, losses.values())):
            stop_nonfinite(f'in the eval at iter {iter_num}')
        improved = losses['val_loss'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val_loss'])
        evals_without_gain = 0 if improved else evals_without_gain + 1
        if (improved or always_save_checkpoint) and 0 < iter_num < max_iters:  # max_iters is saved as 'final'
            best_tag = f'iter_{iter_num}' if improved else best_tag
            save(f'iter_{iter_num}')
        if early_stop_patience and evals_without_gain >= early_stop_patience:
            say(f'early stop: val loss has not improved on {best_val_loss:.4f} in {evals_without_gain} evals')
            break
        t_log, iters_since_log = time.time(), 0  # eval time is not training time
        if timer:
            timer.restart()
    if iter_num >= max_iters:
        break
    mark('other')  # the loop's own work since the last step (logging, the lr)

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    loss_sum = torch.zeros((), device=device)
    skipped_before = model_engine.skipped_steps
    X, Y = get_batch('train', batch_rng)
    mark('data')
    for micro_step in range(gradient_accumulation_steps):
        _, loss = model_engine(X, Y)
        mark('forward')
        if micro_step + 1 < gradient_accumulation_steps:
            X, Y = get_batch('train', batch_rng)  # while the GPU is busy with the forward pass
            mark('data')
        model_engine.backward(loss)  # DeepSpeed scales by 1/accumulation (and the fp16 loss scale)
        mark('backward')
        model_engine.step()  # updates the weights only at the accumulation boundary
        mark('step')
        loss_sum += loss.detach().float()
    iter_num += 1
    iters_since_log += 1
    if bar:
        bar.update(1)
    if not model_engine.skipped_steps > skipped_before:  # an fp16 step its loss scaler skipped harmed nothing
        nonfinite_streak = torch.where(torch.isfinite(loss_sum), 0.0, nonfinite_streak + 1)
        nonfinite_worst = torch.maximum(nonfinite_worst, nonfinite_streak)
    stop_flag = torch.tensor(float(bool(stop_signal)))
    dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX, group=stop_group)  # the ranks agree on where to stop

    if iter_num % log_interval == 0 or iter_num == max_iters:
        mean_loss = loss_sum / gradient_accumulation_steps
        dist.all_reduce(mean_loss)  # the global batch's loss; the sync is paid only at log intervals
        lossf = mean_loss.item() / world_size
        dt_ms = (time.time() - t_log) * 1000 / iters_since_log
        t_log, iters_since_log = time.time(), 0
        tokens_per_s = tokens_per_iter / (dt_ms / 1000)
        record = {'iter': iter_num - 1, 'loss': lossf, 'lr': lr, 'dt_ms': dt_ms, 'tokens_per_s': tokens_per_s}
        share, why_no_mfu = mfu(model_flops_per_token * tokens_per_s, world_size, peak_flops)
        if share is not None:
            record['mfu'] = share
        if why_no_mfu and master_process and not said_why_no_mfu:
            say(why_no_mfu)
            said_why_no_mfu = True
        memory = memory_mb(on_gpu)
        highest = torch.tensor([*memory.values(), nonfinite_worst], dtype=torch.float64, device=device)
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)  # the rank closest to running out is the one that matters
        *highest, worst = highest.tolist()
        record.update(zip(memory, highest))
        nonfinite_worst.zero_()
        if dtype == 'float16':
            record.update(loss_scale=optimizer.cur_scale, skipped_steps=model_engine.skipped_steps)
        shares = timer.fractions() if timer else {}
        record.update({f'{phase}_frac': share for phase, share in shares.items()})
        if master_process:
            say(log_line(record))
            if bar:
                bar.set_postfix(loss=f'{lossf:.4f}', tok_s=f'{tokens_per_s:,.0f}', refresh=False)
        log_record(record)
        if worst >= max_nonfinite:
            stop_nonfinite(f'in {worst:.0f} iterations in a row (up to iter {iter_num - 1}; '
                           f'max_nonfinite={max_nonfinite})')
    if stop_flag.item() and iter_num < max_iters:  # pre-empted: every rank saves this step's state, then exits 0
        save(f'iter_{iter_num}')
        if master_process:
            say(f"{stop_signal.signal_name or 'a signal to another rank'}: stopped after iter {iter_num - 1} "
                f"and saved {os.path.join(out_dir, f'iter_{iter_num}')}; go on with --init_from=resume")
        preempted = True
        break

if bar:
    bar.close()
if not eval_only and not preempted:
    save('final')
    if master_process:
        print(f"done: best val loss {best_val_loss:.4f}; checkpoints in {out_dir} (tags: "
              f"{', '.join(checkpoints.complete_tags(out_dir))})")
        if plot:
            from plot import plot_run
            try:
                print(f'plotted {plot_run(out_dir)}')
            except SystemExit as e:  # a missing plot is no reason to fail a finished run
                print(f'warning: no plot: {e}', file=sys.stderr)
    if sample_max_new_tokens > 0:  # every rank runs it: under ZeRO-3 the forward pass gathers weights collectively
        from tokenizer import load_codec
        encode, decode = load_codec(meta_path)
        torch.manual_seed(seed)
        model_engine.eval()
        start = torch.tensor([encode(sample_start)], dtype=torch.long, device=device)
        out = model_engine.module.generate(start, sample_max_new_tokens, temperature=0.8, top_k=200)
        if master_process:
            print('-' * 40 + '\n' + decode(out[0].tolist()) + '\n' + '-' * 40)
log_record.close()

# gloo can abort at interpreter exit ('terminate called without an active exception') after the work
# is done, failing the launcher at random: leave the process group, flush, and exit at once instead
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
