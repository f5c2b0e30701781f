"""
What fits on each GPU: a per-GPU memory plan for ZeRO 0/1/2/3, with and without CPU offload, for a GPT-2
shape from model.py. Arithmetic only (no GPU, no process group), so train_deepspeed.py's dry run can print
it. Three parts, added as if they peaked together, which they nearly do at the start of backward:
  model states  16-bit (or fp32) weights and gradients, fp32 master weights, Adam's m and v
  activations   what autograd keeps for backward for one micro batch
  buffers       ZeRO's communication buckets, sized by the JSON's zero_optimization block
Not counted, so leave a margin: the CUDA context and NCCL's workspaces (some hundreds of MB,
driver-dependent), the caching allocator's fragmentation, and the token ids (about 16 bytes a token).
"""

import psutil
import torch
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from model import GPTConfig, is_pretrained_source, num_params, pretrained_config
from nanogpt_ds.ds_setup import bf16_speedup, choose_dtype, offload_of, ranks_on_this_host
from nanogpt_ds.settings import die
from nanogpt_ds.perf import memory_mb

# bytes per element of weights, gradients, activations
DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
FP32_BYTES = 4
ADAM_BYTES = 8  # Adam's m and v per parameter, both fp32
# engine.py MEMORY_OPT_ALLREDUCE_SIZE: ZeRO-0's gradient all-reduce buffer
STAGE0_ALLREDUCE_ELEMENTS = 500_000_000
# tables print GiB, the unit of nvidia-smi and torch.cuda.mem_get_info (a "32GB" V100 has 32 GiB)
GIB = 2 ** 30
# offload_optimizer: ZeRO 1-3; offload_param too: ZeRO-3 only
OFFLOADS = ('none', 'optimizer', 'optimizer+params')
# the JSONs that ship beside the trainer, by the (stage, offload) they run
SHIPPED_JSONS = {(2, 'none'): 'ds_config_zero2.json', (3, 'none'): 'ds_config_zero3.json',
                 (2, 'optimizer'): 'ds_config_zero2_offload.json',
                 (3, 'optimizer+params'): 'ds_config_zero3_offload.json'}


def largest_layer_params(config):
    """The most parameters one module owns (what ZeRO-3 gathers at once): wte (tied with lm_head), wpe or
    c_fc."""
    d = config.n_embd
    return max(config.vocab_size * d, config.block_size * d, 4 * d * d + 4 * d * config.bias)


def _check(stage, offload):
    if stage not in (0, 1, 2, 3) or offload not in OFFLOADS:
        raise ValueError(f'stage {stage!r}, offload {offload!r}: stages are 0-3, offloads {OFFLOADS}')
    if (stage == 0 and offload != 'none') or (stage < 3 and offload == 'optimizer+params'):
        raise ValueError(f'ZeRO-{stage} has no {offload} offload: '
                         'optimizer offload needs 1-3, param offload 3')


def _model_states_by_hand(n, largest, stage, world_size, offload, dtype):
    """(GPU bytes, CPU bytes) per rank in the categories of DeepSpeed's estimators (stage_1_and_2.py: '18 =
    2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit'), for the cases they don't
    cover."""
    w = DTYPE_BYTES[dtype]
    shard = world_size if stage else 1  # ZeRO-1 and up split the optimizer's share over the ranks
    # the fp32 master copy: 16-bit training always keeps one; in fp32, ZeRO-1/2 still clone their partition
    # (stage_1_and_2.py, weights_partition = ...clone()); ZeRO-3 steps its fp32 shard in place unless it is
    # offloaded (stage3.py clones it to the CPU); without ZeRO the torch optimizer steps the weights
    # themselves
    master = 0 if w == FP32_BYTES and (stage == 0 or (stage == 3 and offload == 'none')) else FP32_BYTES
    # 16-bit training hands the optimizer an fp32 copy of the gradient
    fp32_grad = FP32_BYTES if w == 2 else 0
    # ZeRO-3: a shard + the layer in use
    weights = (w * n / world_size + 2 * w * largest) if stage == 3 else w * n
    grads = w * n / (world_size if stage >= 2 else 1)
    if offload == 'none':
        gpu, cpu = weights + grads + (fp32_grad + master + ADAM_BYTES) * n / shard, 0
    else:  # the optimizer steps on the CPU with an fp32 gradient; ZeRO-1 still accumulates whole grads on GPU
        gpu, cpu = weights + (grads if stage == 1 else 0), (FP32_BYTES + master + ADAM_BYTES) * n / world_size
    if offload == 'optimizer+params':
        gpu, cpu = gpu - w * n / world_size, cpu + w * n / world_size
    return int(gpu), int(max(cpu, start_host_bytes(n, largest, stage)))


def start_host_bytes(n_params, largest_layer_params, stage):
    """Host memory a rank needs to start, the floor of its CPU column (model_init.py): under ZeRO 0-2 it
    builds the whole model in fp32 on the host (as DeepSpeed's estimators assume with zero_init=False); under
    ZeRO-3 (deepspeed.zero.Init) each parameter is made whole once, one at a time, before its shard leaves
    (zero_init=True)."""
    return FP32_BYTES * (largest_layer_params if stage == 3 else n_params)


def model_states_bytes(n_params, largest_layer_params, stage, world_size, offload='none', dtype='bfloat16'):
    """(GPU bytes, CPU bytes) of model states per rank. 16-bit ZeRO-2/3 come from DeepSpeed's own estimators,
    which assume 16-bit training; fp32 and ZeRO-0/1 (no estimator) are counted by hand in the same
    categories."""
    _check(stage, offload)
    if DTYPE_BYTES[dtype] == FP32_BYTES or stage < 2:
        return _model_states_by_hand(n_params, largest_layer_params, stage, world_size, offload, dtype)
    # additional_buffer_factor=1.0: buffers are counted by buffer_bytes; the factor only scales the CPU figure
    # anyway. The estimators return CPU RAM per node; we ask for one node of world_size GPUs and divide. GPU
    # bytes depend on the total of GPUs only, and the per-rank CPU share comes out the same on several nodes.
    if stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(n_params, world_size, 1, offload != 'none', 1.0)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(n_params, largest_layer_params, world_size, 1,
                                                            offload != 'none', offload == 'optimizer+params',
                                                            True, 1.0)  # zero_init: start_host_bytes
        # stage3.py's grad_partitions_flat_buffer, 16-bit on the GPU: the estimator omits it
        if offload == 'none':
            gpu += 2 * n_params // world_size
    return gpu, cpu // world_size


def activation_bytes(config, micro_batch, dtype='bfloat16', fused_attention=True, checkpointing=False):
    """Bytes autograd holds at the start of backward for one micro batch. Korthikanti et al. 2022
    (sbh(34 + 5as/h) bytes in 16-bit a layer, dropout masks included) recounted for model.py, which a test
    checks against autograd's saved tensors. fused_attention: SDPA's flash / memory-efficient kernels (what a
    GPU runs in fp16, bf16 and fp32) keep q, k, v, the output and a log-sum-exp, never the T x T matrix; False
    is the math path, which keeps it. checkpointing (model.py's gradient_checkpointing): each block keeps only
    its input, and the backward pass recomputes one block at a time, which then holds its full set."""
    w, b, s, h, a = DTYPE_BYTES[dtype], micro_batch, config.block_size, config.n_embd, config.n_head
    sbh, tokens, dropout = s * b * h, s * b, config.dropout > 0
    # a Block keeps 16 sbh elements: ln_1 and ln_2 inputs 2, c_attn input 1, q k v 3 (views of c_attn's
    # output), SDPA's output 1 (attn.c_proj's input: the transpose().contiguous() of it is a no-op), c_fc
    # input 1, GELU input 4, mlp.c_proj input 4; plus fp32 stats: the log-sum-exp (a per token) and each
    # LayerNorm's mean and rstd
    layer = 16 * sbh * w + FP32_BYTES * (a + 2 * 2) * tokens
    # the softmax output a*s*s*b, and with dropout its 1-byte mask and the dropped copy
    if not fused_attention:
        layer += a * s * tokens * (w + (1 + w if dropout else 0))
    if dropout:  # 1-byte masks of resid_dropout and mlp.dropout (a GPU's fused dropout keeps bool masks)
        layer += 2 * sbh
    ln_f = 2 * sbh * w + 2 * FP32_BYTES * tokens  # ln_f's input and output and stats
    blocks = config.n_layer * layer
    if checkpointing:  # the recomputed block's ln_1 input is the input it kept: counted once
        blocks = config.n_layer * sbh * w + layer - sbh * w
    total = blocks + ln_f
    total += sbh if dropout else 0  # the embedding dropout's mask
    # the logits: the compute-dtype lm_head output the training loop holds, the fp32 log-softmax
    # cross-entropy keeps, and at the start of backward the two fp32 gradients log_softmax's backward has at
    # once
    return total + tokens * config.vocab_size * (w + 3 * FP32_BYTES)


def buffer_bytes(ds_zero_config, stage, dtype, n_params, resident=False):
    """The allowance for ZeRO's buckets, in the compute dtype. ds_zero_config: the JSON's zero_optimization
    block (or the whole JSON); DeepSpeed's own config class fills in its defaults (buckets 5e8 elements;
    overlap_comm on for ZeRO-3 only) and the stage we ask about replaces the JSON's. resident: only what gets
    written, a bucket never holding more than the model's gradients (the resident set of a CPU rank; a GPU
    allocates it all)."""
    z = DeepSpeedZeroConfig(**{**ds_zero_config.get('zero_optimization', ds_zero_config), 'stage': stage})
    if stage == 0:  # the engine's all-reduce flattens the gradients into buffers of up to 5e8 elements
        return DTYPE_BYTES[dtype] * min(STAGE0_ALLREDUCE_ELEMENTS, n_params)
    # ZeRO-1/2 allocate a reduce bucket of reduce_bucket_size elements whatever the model's size, and a second
    # one with overlap_comm (stage_1_and_2.py setup_buckets); ZeRO-3 one, overlap_comm or not (stage3.py).
    # None without contiguous_gradients. allgather_bucket_size is a message size, not memory: the updated
    # weights are gathered in place into the flat 16-bit buffer (runtime/utils.py all_gather_dp_groups).
    bucket = min(z.reduce_bucket_size, n_params) if resident else z.reduce_bucket_size
    elements = bucket * (2 if z.overlap_comm and stage < 3 else 1) if z.contiguous_gradients else 0
    if stage == 3:  # parameters gathered ahead of the layer in use, capped by max_live_parameters
        elements += min(z.prefetch_bucket_size, z.max_live_parameters, n_params)
    return DTYPE_BYTES[dtype] * elements


def plan(config, micro_batch, grad_accum, world_size, dtype, ds_zero_config, gpu_mem_bytes=None,
         resident=False, checkpointing=False):
    """One row per (stage, offload) DeepSpeed offers: GiB per GPU and fits (None when gpu_mem_bytes is
    unknown).
    grad_accum changes nothing on the GPU (gradients accumulate in place); it is carried for the table."""
    n, largest = num_params(config), largest_layer_params(config)
    act = activation_bytes(config, micro_batch, dtype, checkpointing=checkpointing)
    rows = []
    for stage in (0, 1, 2, 3):
        for offload in OFFLOADS[:1 if stage == 0 else 2 if stage < 3 else 3]:
            gpu, cpu = model_states_bytes(n, largest, stage, world_size, offload, dtype)
            buf = buffer_bytes(ds_zero_config, stage, dtype, n, resident)
            total = gpu + act + buf
            rows.append(dict(stage=stage, offload=offload, micro_batch=micro_batch, grad_accum=grad_accum,
                             checkpointing=checkpointing,
                             model_states_gib=gpu / GIB, activations_gib=act / GIB, buffers_gib=buf / GIB,
                             total_gib=total / GIB, cpu_gib=cpu / GIB,
                             fits=None if gpu_mem_bytes is None else total <= gpu_mem_bytes))
    return rows


def recommend(config, global_batch, world_size, dtype, ds_zero_config, gpu_mem_bytes):
    """The fastest configuration a shipped JSON runs that fits with micro_batch * grad_accum * world_size ==
    global_batch (sequences per step), or None. The cost model, slowest lever last: no offload before offload
    (the step waits for the CPU's Adam and PCIe), then no gradient checkpointing (recomputation is about a
    third more compute), then ZeRO-2 before ZeRO-3 (1.5x the communication), then the largest micro batch
    (the fewest micro steps)."""
    if global_batch % world_size:
        raise ValueError(f'a global batch of {global_batch} sequences does not split over {world_size} ranks')
    per_rank = global_batch // world_size
    fitting = []
    for m in range(1, per_rank + 1):
        if per_rank % m:
            continue  # a micro batch must split the rank's share into whole micro steps
        for checkpointing in (False, True):
            rows = plan(config, m, per_rank // m, world_size, dtype, ds_zero_config, gpu_mem_bytes,
                        checkpointing=checkpointing)
            fitting += [r for r in rows if r['fits'] and (r['stage'], r['offload']) in SHIPPED_JSONS]

    def cost(r):  # the order of the docstring, cheapest first
        return OFFLOADS.index(r['offload']), r['checkpointing'], r['stage'] == 3, -r['micro_batch']
    return min(fitting, key=cost, default=None)


def overrides_for(best, in_use, checkpointing):
    """A recommended row as what it is and the command-line overrides that apply it to a run whose JSON runs
    in_use (stage, offload) and whose gradient_checkpointing is checkpointing."""
    advice = f"ZeRO-{best['stage']}"
    if best['offload'] != 'none':
        advice += f" with {best['offload']} offload"
    if (best['stage'], best['offload']) != in_use:
        advice += f" --deepspeed_config={SHIPPED_JSONS[best['stage'], best['offload']]}"
    advice += f" --batch_size={best['micro_batch']} --gradient_accumulation_steps={best['grad_accum']}"
    if best['checkpointing'] != checkpointing:
        advice += f" --gradient_checkpointing={best['checkpointing']}"
    return advice + f" ({best['total_gib']:.1f} GiB)"


def format_plan(rows, title='', in_use=None):
    """A plain-text table per GPU, one decimal, in GiB (MiB when every total is under 1 GiB, as for the CPU
    demo); CPU is each rank's share of the node's RAM. in_use: (stage, offload, JSON) marks the JSON's row."""
    unit, scale = ('GiB', 1) if max(r['total_gib'] for r in rows) >= 1 else ('MiB', 1024)
    head = f"{'ZeRO':>4}  {'offload':<16} {'micro x GA':>10} {'states':>8} {'activ.':>8} {'buffers':>8} " \
           f"{'total':>8} {'CPU/rank':>8}  fits"
    lines = ([title] if title else []) + [head, '-' * len(head)]
    for r in rows:
        sizes = ' '.join(f"{r[k] * scale:>8.1f}" for k in
                         ('model_states_gib', 'activations_gib', 'buffers_gib', 'total_gib', 'cpu_gib'))
        steps = f"{r['micro_batch']} x {r['grad_accum']}"
        fits = {None: '?', True: 'yes', False: 'NO'}[r['fits']]
        line = f"{r['stage']:>4}  {r['offload']:<16} {steps:>10} {sizes}  {fits}"
        if in_use and (r['stage'], r['offload']) == in_use[:2]:
            line += ' ' * (4 - len(fits)) + f'<- {in_use[2]}'
        lines.append(line)
    lines.append(f'{unit} per GPU; not counted: CUDA context, NCCL workspaces, allocator fragmentation: '
                 'leave a margin')
    return '\n'.join(lines)


# What a CPU rank adds beyond its imports and the plan's tensors once it trains: the process group, the
# DeepSpeed engine's own buffers, the kernels' scratch and the allocator's cache. Measured on the CPU demo
# (2 ranks, ZeRO-2): 0.08 GiB on a Xeon without AMX, 0.12-0.17 GiB on one with AMX (oneDNN's kernels
# differ); a rough constant, as "leave a margin" is on GPU.
ENGINE_RESIDENT_GIB = 0.12


def report(config, micro_batch, grad_accum, world_size, dtype, ds_config, stage, config_path,
           gpu_mem_bytes=None, cpu_runtime_gib=None, checkpointing=False, host=None):
    """The dry run's text: the table, a recommendation when the GPU's size is known, for a run on this
    machine's CPU ranks (cpu_runtime_gib: what a rank holds before any model) the resident memory per rank,
    and with host (host_memory_lines' ranks_per_node, host_ram_gib, runtime_gib) what a node needs."""
    rows = plan(config, micro_batch, grad_accum, world_size, dtype, ds_config, gpu_mem_bytes,
                checkpointing=checkpointing)
    lines = [format_plan(rows, in_use=(stage, offload_of(ds_config), config_path))]
    global_batch = micro_batch * grad_accum * world_size
    if gpu_mem_bytes:
        best = recommend(config, global_batch, world_size, dtype, ds_config, gpu_mem_bytes)
        advice = 'nothing fits: more GPUs, a shorter block_size or a smaller model'
        if best:
            advice = overrides_for(best, (stage, offload_of(ds_config)), checkpointing)
        lines.append(f'recommended for {gpu_mem_bytes / GIB:.1f} GiB per GPU and {global_batch} sequences '
                     f'per step: {advice}')
        lines.append('(the fastest that fits: no offload, then no gradient checkpointing, then ZeRO-2 before '
                     'ZeRO-3, then the largest micro batch)')
    if cpu_runtime_gib is not None:  # CPU ranks write only what their buckets hold: count them that far
        rows = plan(config, micro_batch, grad_accum, world_size, dtype, ds_config, resident=True,
                    checkpointing=checkpointing)
        own = next(r for r in rows if r['stage'] == stage and r['offload'] == 'none')
        total_gib = cpu_runtime_gib + ENGINE_RESIDENT_GIB + own['total_gib']
        lines.append(f'CPU ranks here: about {total_gib:.2f} GiB resident per rank '
                     f'({cpu_runtime_gib:.2f} runtime + {ENGINE_RESIDENT_GIB:.2f} engine + '
                     f"{own['total_gib']:.2f} ZeRO-{stage} plan, buckets counted as far as they fill)")
    if host is not None:
        in_use = next(r for r in rows if (r['stage'], r['offload']) == (stage, offload_of(ds_config)))
        per_rank_gib = total_gib if cpu_runtime_gib is not None else in_use['cpu_gib'] + host['runtime_gib']
        lines += host_memory_lines(per_rank_gib, stage, **host)
    return '\n'.join(lines)


def host_memory_lines(per_rank_gib, stage, ranks_per_node, host_ram_gib, runtime_gib):
    """What a node's RAM must hold: its ranks x what each holds at the start or after (the CPU column, or a
    CPU rank's resident set), and a warning when this host has less."""
    need_gib = ranks_per_node * per_rank_gib
    lines = [f'host memory per node: {ranks_per_node} rank(s) x {per_rank_gib:.1f} GiB = {need_gib:.1f} GiB '
             f'(CPU/rank with {runtime_gib:.1f} GiB of runtime each); this host has {host_ram_gib:.1f} GiB']
    if need_gib > host_ram_gib:
        fix = 'fewer ranks per node'
        if stage < 3:  # under ZeRO 0-2 every rank builds the whole model on the host first
            fix += ', or ZeRO-3 (--deepspeed_config=ds_config_zero3.json): its ranks build only their shards'
        lines.append(f'warning: the ranks of one node need {need_gib:.1f} GiB of host memory, more than this '
                     f'host has ({host_ram_gib:.1f} GiB): {fix}')
    return lines


def dry_run(config, scratch_args, ds_config, world_size, dtype_why, time_bf16, data_note, on_gpu):
    """The text of `train_deepspeed.py --dry_run=True`: the run's shape and batch, then the plan. From the
    shape alone: a meta-device model (no weights, no memory), no process group, a note where data is missing.
    config: the script's resolved settings; the rest as the script worked them out."""
    init_from, dtype, stage = config['init_from'], config['dtype'], config['zero_stage']
    batch_size, accumulation = config['batch_size'], config['gradient_accumulation_steps']
    plan_gpus, plan_gpu_mem_gb = config['plan_gpus'], config['plan_gpu_mem_gb']
    if init_from == 'scratch':
        shape = GPTConfig(**scratch_args)
    elif is_pretrained_source(init_from):
        shape = pretrained_config(init_from)
        shape.block_size, shape.dropout = min(config['block_size'], shape.block_size), config['dropout']
    else:
        die(f'dry_run plans a start from scratch or a pretrained model, not init_from={init_from!r}')
    n_params = num_params(shape)  # from the shape alone: a model built on 'meta' cost 2 s of the plan's 4
    if time_bf16:
        dtype, dtype_why = choose_dtype('auto', False, 0, True, False,
                                        bf16_speedup(shape, batch_size, collective=False))
    gpu_mem = (plan_gpu_mem_gb or config['gpu_mem_cap_gb']) * GIB  # a capped GPU is planned as the cap
    if on_gpu and not gpu_mem:
        gpu_mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    world = f'world size {world_size}' + (' (plan_gpus)' if plan_gpus > 0 else '')
    tokens_per_iter = batch_size * accumulation * world_size * config['block_size']
    lines = [f'dry run: {init_from}, {n_params:,} parameters ({shape.n_layer} layers, {shape.n_head} heads, '
             f'{shape.n_embd} wide, context {shape.block_size}, vocab {shape.vocab_size}), {dtype}, '
             f"ZeRO-{stage} in {config['deepspeed_config']}"
             + (', gradient checkpointing' if config['gradient_checkpointing'] else ''),
             f'{world}; train_batch_size = {batch_size} (micro) x {accumulation} (accumulation) x '
             f"{world_size} (world) = {ds_config['train_batch_size']} sequences, "
             f'{tokens_per_iter:,} tokens per iter']
    if dtype_why:
        lines.append(f'dtype auto -> {dtype}: {dtype_why}')
    if data_note:
        lines.append(data_note)
    from torch import _dynamo  # noqa: F401  deepspeed.initialize imports it on first use: ~70 MB a rank
    runtime_gib = memory_mb(False)['rss_mb'] / 1024  # torch, DeepSpeed and what they import
    planning_own_cpu_ranks = not on_gpu and not plan_gpus and not plan_gpu_mem_gb
    # a plan for GPUs elsewhere puts them on one node; a launched dry run has its launcher's count
    ranks_per_node = world_size
    if not plan_gpus:
        ranks_per_node = ranks_on_this_host(world_size)
    host = dict(ranks_per_node=ranks_per_node, host_ram_gib=psutil.virtual_memory().total / GIB,
                runtime_gib=runtime_gib)
    own_ranks_runtime_gib = runtime_gib if planning_own_cpu_ranks else None
    lines.append(report(shape, batch_size, accumulation, world_size, dtype, ds_config, stage,
                        config['deepspeed_config'], gpu_mem or None, own_ranks_runtime_gib,
                        config['gradient_checkpointing'], host))
    return '\n'.join(lines)
