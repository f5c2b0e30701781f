"""
Fine-tune (or train from scratch) a GPT-2 with DeepSpeed ZeRO, nanoGPT style.

The defaults are the headline run, gpt2-xl on Shakespeare with ZeRO-2 on 4 GPUs (run_deepspeed_xl.sh
also picks GPUs by CUDA_VISIBLE_DEVICES, which DeepSpeed's launcher ignores):
$ deepspeed --num_gpus 4 train_deepspeed.py
No GPU: the same code on 2 CPU ranks over gloo (after python data/shakespeare_char/prepare.py):
$ deepspeed --num_gpus 2 train_deepspeed.py config/train_shakespeare_char_cpu.py
$ deepspeed --num_gpus 4 train_deepspeed.py --init_from=resume [--resume_tag=iter_10]  # newest, or a tag
"""
from configurator import answer_help

answer_help(__file__)  # --help or -h: the settings below, read from this file, before anything loads
import dataclasses
import math
import os
import time

# -----------------------------------------------------------------------------
# defaults: gpt2-xl on Shakespeare, 4x V100-32GB, ZeRO-2 fp16 (~303 ms/iter, 15-16 GB per GPU)
# I/O
out_dir = 'out-shakespeare-xl-deepspeed'
eval_interval = 5  # iters between evals (and checkpoint chances)
log_interval = 1  # iters between log lines; the only host syncs in the loop happen here
progress = True  # a tqdm bar on rank 0 when stdout is a terminal (plain log lines otherwise)
time_phases = True  # data/forward/backward/step shares in each log line (GPU events: no extra host sync)
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0: perf.py's table (GPU), a matmul timed at start (CPU)
wandb_log = False  # also log to Weights & Biases (WANDB_MODE=offline works without a network)
wandb_project = 'nanogpt-deepspeed'
wandb_run_name = ''  # empty: wandb picks one; a resumed run continues its checkpoint's wandb run
tensorboard_log = False  # also log to out_dir/tensorboard
plot = False  # at the end, draw out_dir/loss.png (plot.py)
# dry run: `python train_deepspeed.py ... --dry_run=True` builds nothing, loads no weights, writes nothing
dry_run = False  # print the batch, the parameter count and the memory plan per GPU for ZeRO 0-3, then exit
plan_gpus = 0  # plan for this many GPUs (0: the launcher's world size)
plan_gpu_mem_gb = 0.0  # GiB per GPU to fit in (0: the visible GPU's); recommends a stage and micro batch
gpu_mem_cap_gb = 0.0  # > 0: each rank uses at most this many GiB of its GPU (a smaller card, rehearsed)
eval_iters = 20  # batches per split per rank at each eval
eval_only = False  # evaluate once, print every rank's view of the result, exit
always_save_checkpoint = False  # save at every eval, not only when val loss improves
keep_last_n = 2  # iter_* checkpoints kept; the best-val one and 'final' are kept besides
min_free_disk_mb = 100  # a save first checks for a checkpoint's size plus this much free, else the run stops
early_stop_patience = 0  # evals in a row without a better val loss that end the run (saved); 0: never
max_nonfinite = 3  # iterations in a row with a NaN/inf loss that stop the run (nothing more is saved)
init_from = 'gpt2-xl'  # 'scratch', 'resume', 'gpt2' ... 'gpt2-xl' or a folder saved by transformers
resume_tag = ''  # with init_from='resume': a tag like 'iter_10'; empty means the one named in out_dir/latest
# data
dataset = 'shakespeare'  # data/<dataset>/{train,val}.bin (uint16 token ids), a folder, a mix {name: weight}
gradient_accumulation_steps = 32  # micro steps per optimizer step, per rank
batch_size = 1  # micro batch per GPU (DeepSpeed's train_micro_batch_size_per_gpu)
block_size = 1024  # tokens per sample
# model, for init_from='scratch' (pretrained and resumed runs take the checkpoint's shape)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining; try 0.1+ when fine-tuning small data for long
bias = True  # biases in Linear and LayerNorm, as in GPT-2
gradient_checkpointing = False  # recompute each block in backward: 1 block's activations, ~1/3 more compute
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
lr_decay_iters = 20  # follows max_iters unless given
min_lr = 3e-6  # follows learning_rate / 10 unless given
# system
deepspeed_config = 'ds_config_zero2.json'  # ZeRO settings; batch, clipping and precision come from here
dtype = 'auto'  # 'float32', 'bfloat16', 'float16', 'auto': bf16 from Ampere (fp16 before); CPU: where it pays
compile = 'auto'  # torch.compile through DeepSpeed's engine; auto: where it pays (ds_setup.resolve_compile)
dist_timeout_s = 0.0  # a collective waiting this long for a lost rank ends the run; 0: 120 on CPU, 600 on GPU
seed = 1337
sample_max_new_tokens = 0  # > 0: print a sample of this many tokens at the end
sample_start = '\n'
# -----------------------------------------------------------------------------
from configurator import configure

config_keys, overrides, followed = configure(globals())  # followed: e.g. lr_decay_iters took max_iters
config = {k: globals()[k] for k in config_keys}  # the resolved settings, logged and checkpointed
# -----------------------------------------------------------------------------
from nanogpt_ds import settings
from nanogpt_ds.settings import die, user_errors

with user_errors():  # before torch loads: a wrong number costs a Python start, not torch's and DeepSpeed's
    settings.check(config)

import numpy as np
import torch

from nanogpt_ds import checkpoints, data_sources
from nanogpt_ds.ds_setup import (exit_cleanly, init_distributed, nonfinite_fix, offload_of, prepare_process,
                                 resolve_compile, resolve_ds_config, resolve_dtype, settle_cpu_dtype,
                                 start_engine, use_device)
from nanogpt_ds.loss_plot import plot_after_run
from nanogpt_ds.model_init import build, start_shape
from nanogpt_ds.perf import (MetricsLog, StepMeter, eval_line, log_line, progress_bar, start_line,
                             write_run_json)
from nanogpt_ds.preemption import StopFlag
from nanogpt_ds.tokenizer import sample_text

prepare_process()  # a world of one for plain `python train_deepspeed.py`; CPU ranks share the cores

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator  # after the environment is set: picked on import

accelerator = get_accelerator()
on_gpu = accelerator.device_name() == 'cuda'
local_rank, rank = int(os.environ['LOCAL_RANK']), int(os.environ['RANK'])
world_size = plan_gpus if dry_run and plan_gpus > 0 else int(os.environ['WORLD_SIZE'])
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
with user_errors():  # time_bf16: on a CPU with bf16 kernels, fp32 until bf16 is timed on the model below
    dtype, dtype_why, time_bf16 = resolve_dtype(config, on_gpu, local_rank)
    ds_config, stage = resolve_ds_config(deepspeed_config, batch_size, gradient_accumulation_steps,
                                         world_size, grad_clip, dtype)
    device = use_device(accelerator, local_rank, on_gpu, gpu_mem_cap_gb)
compile, compile_note = resolve_compile(compile, on_gpu, stage)  # auto: on with GPUs under ZeRO 0-2
config.update(dtype=dtype, zero_stage=stage, compile=compile)

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
    if source is None and len(sources) > 1:  # a mix draws each batch's dataset by weight
        source = source_names[rng.choice(len(source_names), p=source_weights)]
    source = source or source_names[0]
    # a new memmap per batch: a long-lived one keeps every page read resident (nanoGPT#151)
    data = np.memmap(os.path.join(sources[source][0], f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if on_gpu:
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


meta_path = data_sources.vocabulary_file(sources[source_names[0]][0]) if sources else ''  # a mix shares one
meta = data_sources.read_meta(meta_path)  # None: GPT-2 BPE, whose 50257 ids a scratch model pads to 50304
scratch_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                    dropout=dropout, vocab_size=meta['vocab_size'] if meta else 50304)

if dry_run:  # the plan from the shape alone (memory_plan.py): no weights, no process group, no data needed
    from nanogpt_ds import memory_plan  # imports DeepSpeed's estimators: only once the environment is set
    print(memory_plan.dry_run(config, scratch_args, ds_config, world_size, dtype_why, time_bf16, data_note,
                              on_gpu), flush=True)
    os._exit(0)

with user_errors():  # the files first, found out before the process group starts
    checkpoints.check_writable(out_dir)
    saved = checkpoints.to_resume(out_dir, resume_tag) if init_from == 'resume' else None  # shape, stage...
    # every node's ranks meet, with the same settings
    rank, world_size = init_distributed(accelerator.communication_backend_name(), on_gpu, config)
master_process = rank == 0

# -----------------------------------------------------------------------------
# model: a checkpoint's shape (its weights load below), scratch or pretrained; one copy of the weights at
# most, under ZeRO-3 only each rank's shard (model_init.py)
with user_errors():
    node_disks = checkpoints.use_node_disks(out_dir, ds_config)  # no shared file system: a folder per node
    if saved:  # the nodes agree on a tag; every rank checks its own files
        saved = checkpoints.check_before_load(saved, ds_config, world_size, node_disks)
    shape = start_shape(init_from, scratch_args, overrides, saved and saved['model_args'])
    checkpoints.check_disk(out_dir, shape, dtype, min_free_disk_mb)  # before any training it would lose
    data_sources.check_token_ids(sources, shape.vocab_size)
    if time_bf16:  # every rank times bf16 against fp32 on a block of this model (or keeps the checkpoint's)
        dtype, dtype_why = settle_cpu_dtype(shape, batch_size, saved, ds_config)
        config['dtype'] = dtype
    model = build(shape, None if saved else init_from, seed, ds_config if stage == 3 else None)
model_args, n_params = dataclasses.asdict(shape), model.get_num_params(non_embedding=False)
model.gradient_checkpointing = gradient_checkpointing
torch.manual_seed(seed + rank)  # from here on (dropout) each rank draws its own numbers

cpu_adam = offload_of(ds_config) != 'none'  # ZeRO's optimizer offload steps DeepSpeed's CPU Adam, same update
optimizer = None  # an evaluation that loads nothing steps nothing: no fp32 master copy beside the weights
if not eval_only or saved:
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), cpu_adam=cpu_adam)
model_engine, optimizer = start_engine(model, optimizer, ds_config, stage, dtype, device)
if compile:  # in place (nn.Module.compile): parameter names, checkpoints and exports are as without it
    model_engine.compile()

client_state, note = {}, ''  # the progress a checkpoint saved; where and how it resumed
if saved:
    with user_errors(alone=True):  # this rank's files: the others may have loaded theirs
        client_state, note = checkpoints.resume(model_engine, saved, batch_rng, seed)
iter_num, best_val_loss = client_state.get('iter_num', 0), client_state.get('best_val_loss', 1e9)
best_tag, evals_without_gain = client_state.get('best_tag'), client_state.get('evals_without_gain', 0)
resumed_at = iter_num if saved else None
evaluated_at = resumed_at if client_state.get('evaluated', True) else None  # a stop saves before its eval

meter = StepMeter(model, block_size, batch_size, tokens_per_iter, peak_flops, dtype, on_gpu,
                  local_rank, time_phases)  # tokens/s, MFU, memory, phases; on CPU it times the peak now

if master_process:
    os.makedirs(out_dir, exist_ok=True)
    checkpoints.keep_vocabulary(out_dir, meta_path)
    write_run_json(out_dir, dict(config=config, ds_config=ds_config, world_size=world_size, n_params=n_params,
                                 model_args=model_args, resumed_at=resumed_at, **meter.run_info()))
    print(start_line(config, n_params, world_size, f'{accelerator.device_name()} ({dist.get_backend()})',
                     tokens_per_iter))
    dtype_line = f'dtype auto -> {dtype}: {dtype_why}' if dtype_why else ''
    for line in (followed, note, compile_note, dtype_line):  # what followed another setting; how it resumed
        if line:
            print(line)
    print(meter.start_lines())  # MFU's peak, the host memory the start needed

# metrics.jsonl, and wandb / tensorboard when asked for; a resumed run continues its checkpoint's wandb run
log_record = MetricsLog(out_dir, config, wandb_project if wandb_log else None, wandb_run_name,
                        tensorboard_log, client_state.get('wandb_run_id'), master_process)
nonfinite_streak = torch.zeros((), device=device)  # iterations in a row with a NaN/inf loss, on the device
nonfinite_worst = torch.zeros((), device=device)  # the longest such streak since the last log line


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
    """{'train_loss', 'val_loss'}: the mean loss over eval_iters batches per split on every rank, averaged
    across ranks; a mix has them per dataset too ('val_loss_<name>') and its weighted mean as 'val_loss'. The
    eval batches are the same at every eval (a fresh generator each time), so evals compare like for like."""
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


def stop_nonfinite(where):
    """Stop every rank on a NaN/inf loss, saving nothing: the last checkpoint stays the one to resume."""
    fix = nonfinite_fix(dtype)
    kept = checkpoints.latest_tag(out_dir)
    then = f'the last checkpoint {kept} is untouched: resume from it with' if kept else 'try'
    die(f'loss is NaN/inf {where} (lr {get_lr(iter_num):.3g}, {dtype}): stopped without saving; {then} {fix}')


def save(tag, evaluated=True):
    """Every rank saves its share of out_dir/<tag> (checkpoints.save); never a NaN state over a good one."""
    streak = nonfinite_streak.clone()
    dist.all_reduce(streak, op=dist.ReduceOp.MAX)
    if streak.item() > 0:
        stop_nonfinite(f'at iter {iter_num - 1}, just before saving {tag}')
    client = dict(iter_num=iter_num, evaluated=evaluated, best_val_loss=best_val_loss, best_tag=best_tag,
                  evals_without_gain=evals_without_gain, config=config, model_args=model_args,
                  wandb_run_id=log_record.wandb_run_id)
    with user_errors():  # a disk without room for it: every rank knows
        said = checkpoints.save(model_engine, out_dir, tag, client, batch_rng, keep_last_n,
                                keep={tag, best_tag}, min_free_disk_mb=min_free_disk_mb)
    if master_process:
        print(said)


# -----------------------------------------------------------------------------
# training loop. The batches for iter k are drawn after the eval and checkpoint at k, so a run resumed
# from iter_k draws exactly what the uninterrupted run drew.
t_log, iters_since_log = time.time(), 0
bar, say = progress_bar(master_process and progress, max_iters, iter_num)  # say: a line above the bar
stop_signal = StopFlag(on_gpu, dist_timeout_s, out_dir)  # SIGTERM/INT: save, exit 0; a lost rank: exit 1
preempted = False
while True:
    # evaluate and save. A resumed run does not repeat an eval its checkpoint was saved after
    at_eval = iter_num % eval_interval == 0 or iter_num == max_iters
    if eval_only or (at_eval and iter_num != evaluated_at):
        losses = estimate_loss()
        if eval_only:
            print(f"eval_only: rank {rank} of {world_size} has train loss {losses['train_loss']:.6f}, "
                  f"val loss {losses['val_loss']:.6f} (averaged over ranks)", flush=True)
            break
        if master_process:
            say(eval_line(iter_num, losses))
        log_record({'iter': iter_num, **losses})
        if not all(map(math.isfinite, losses.values())):
            stop_nonfinite(f'in the eval at iter {iter_num}')
        improved = losses['val_loss'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val_loss'])
        evals_without_gain = 0 if improved else evals_without_gain + 1
        mid_run = 0 < iter_num < max_iters  # max_iters is saved as 'final'
        if mid_run and (improved or always_save_checkpoint):
            best_tag = f'iter_{iter_num}' if improved else best_tag
            save(f'iter_{iter_num}')
        if early_stop_patience and evals_without_gain >= early_stop_patience:
            say(f'early stop: val loss has not improved on {best_val_loss:.4f} in {evals_without_gain} evals')
            break
        t_log, iters_since_log = time.time(), 0  # eval time is not training time
        meter.restart()
    if iter_num >= max_iters:
        break
    meter.mark('other')  # the loop's own work since the last step (logging, the lr)

    # the learning rate of this iteration
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    # forward, backward and step, gradient_accumulation_steps times
    log_now = (iter_num + 1) % log_interval == 0 or iter_num + 1 == max_iters  # it ends in a log line
    loss_sum = torch.zeros((), device=device)
    skipped_before = model_engine.skipped_steps
    X, Y = get_batch('train', batch_rng)
    meter.mark('data')
    for micro_step in range(gradient_accumulation_steps):
        _, loss = model_engine(X, Y)
        meter.mark('forward')
        if micro_step + 1 < gradient_accumulation_steps:
            X, Y = get_batch('train', batch_rng)  # while the GPU is busy with the forward pass
            meter.mark('data')
        model_engine.backward(loss)  # DeepSpeed scales by 1/accumulation (and the fp16 loss scale)
        meter.mark('backward')
        if log_now and micro_step + 1 == gradient_accumulation_steps:
            meter.take_grad_norm(model_engine)  # only where DeepSpeed keeps none (ZeRO-0 in fp32)
        model_engine.step()  # updates the weights only at the accumulation boundary
        meter.mark('step')
        loss_sum += loss.detach().float()
    iter_num += 1
    iters_since_log += 1
    bar.update(1)
    step_skipped = model_engine.skipped_steps > skipped_before  # fp16's loss scaler skipped it: no harm
    if not step_skipped:
        nonfinite_streak = torch.where(torch.isfinite(loss_sum), 0.0, nonfinite_streak + 1)
        nonfinite_worst = torch.maximum(nonfinite_worst, nonfinite_streak)
    stop_reason = stop_signal.anywhere()  # None, or the signal any rank had

    # log: the only host syncs of the loop
    if log_now:
        mean_loss = loss_sum / gradient_accumulation_steps
        dist.all_reduce(mean_loss)  # the global batch's loss
        dist.all_reduce(nonfinite_worst, op=dist.ReduceOp.MAX)  # any rank's
        lossf, longest_streak = mean_loss.item() / world_size, nonfinite_worst.item()
        dt_ms = (time.time() - t_log) * 1000 / iters_since_log
        t_log, iters_since_log = time.time(), 0
        record, note = meter.record(iter_num - 1, lossf, lr, dt_ms, model_engine)
        if master_process and note:
            say(note)
        if master_process:
            say(log_line(record))
            bar.set_postfix(loss=f'{lossf:.4f}', tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        log_record(record)
        if longest_streak >= max_nonfinite:
            stop_nonfinite(f'in {longest_streak:.0f} iterations in a row (up to iter {iter_num - 1}; '
                           f'max_nonfinite={max_nonfinite})')
        nonfinite_worst.zero_()
    if stop_reason and iter_num < max_iters:  # pre-empted: every rank saves this step, then exits 0
        tag = f'iter_{iter_num}'
        save(tag, evaluated=False)  # before this iteration's eval, which the resumed run then does
        if master_process:
            say(f'{stop_reason}: stopped after iter {iter_num - 1} and saved {os.path.join(out_dir, tag)}; '
                f'go on with --init_from=resume')
        preempted = True
        break

bar.close()
if not eval_only and not preempted:
    save('final')
    if master_process:
        tags = ', '.join(checkpoints.complete_tags(out_dir))
        print(f'done: best val loss {best_val_loss:.4f}; checkpoints in {out_dir} (tags: {tags})')
    if plot and master_process:
        plot_after_run(out_dir)
    if sample_max_new_tokens > 0:  # every rank: under ZeRO-3 the forward pass gathers weights collectively
        torch.manual_seed(seed)
        text = sample_text(model_engine.module.eval(), meta_path, sample_start, sample_max_new_tokens, device)
        if master_process:
            print('-' * 40 + '\n' + text + '\n' + '-' * 40)
log_record.close()
exit_cleanly()
