"""
The model a run starts from: its shape, then its first weights (GPT-2's init, OpenAI's GPT-2 from the hub or a
folder transformers wrote), built whole or, under ZeRO-3, partitioned as it is built. A start never holds a
second copy of the weights: pretrained tensors are read from their files one slice at a time into the model
(a transformers GPT2LMHeadModel loaded beside it was a second copy), and under ZeRO-3 each rank keeps only its
shard from the start (deepspeed.zero.Init), never the whole model: rank 0 writes each tensor into a gather of
that one parameter. docs/performance.md#start-up-memory has the measurements.
"""
import contextlib

import torch

from model import (GPT, PRETRAINED_SHAPES, GPTConfig, full_shape, is_pretrained_source, local_folder,
                   pretrained_config, row_elements, stored_key, weight_files)
from nanogpt_ds.ds_setup import set_malloc

# a pretrained tensor is copied in slices of at most this much: a safetensors file is memory-mapped, and the
# pages a copy touches stay resident until the file is closed, so each slice opens it anew (a whole file open
# through the load was resident in full: 2x the model's bytes at its end)
SLICE_BYTES = 64 * 2**20


def start_shape(init_from, scratch_args, overrides, resumed_args=None):
    """The GPTConfig a run starts from: a checkpoint's (resumed_args), scratch_args, or a pretrained model's
    with the context cut to scratch_args' block_size and its dropout. ValueError with the fix where the
    settings disagree. Reads no weights."""
    block_size = scratch_args['block_size']
    if resumed_args:
        config = GPTConfig(**resumed_args)
    elif init_from == 'scratch':
        return GPTConfig(**scratch_args)
    elif is_pretrained_source(init_from):
        config = pretrained_config(init_from)
        if block_size > config.block_size:
            raise ValueError(f'block_size={block_size} is more than {init_from} was trained for '
                             f'({config.block_size}): use --block_size={config.block_size} or less')
        config.block_size, config.dropout = block_size, scratch_args['dropout']  # its first positions
    else:
        names = ', '.join(map(repr, PRETRAINED_SHAPES))
        raise ValueError(f"init_from={init_from!r} is none of 'scratch', 'resume', {names} nor a folder with "
                         f'a transformers config.json')
    clash = [f'{k}={overrides[k]}' for k in ('n_layer', 'n_head', 'n_embd', 'bias')
             if k in overrides and overrides[k] != getattr(config, k)]
    if clash:  # a pretrained or resumed model keeps its shape
        raise ValueError(f"{', '.join(clash)} disagrees with {init_from} (n_layer={config.n_layer}, "
                         f'n_head={config.n_head}, n_embd={config.n_embd}, bias={config.bias}): a pretrained '
                         f'or resumed model keeps its shape; drop the override or use --init_from=scratch')
    if block_size > config.block_size:
        raise ValueError(f'block_size={block_size} is more than the checkpoint was trained with '
                         f'({config.block_size})')
    return config


def build(config, weights_from, seed, zero3_config=None):
    """The GPT of shape config with its first weights: GPT-2's init drawn from seed ('scratch'), a pretrained
    source's tensors, or none (None: a checkpoint's come next). zero3_config: the run's DeepSpeed config,
    under ZeRO-3, to build the model partitioned (deepspeed.zero.Init, collective): each rank then holds its
    shard of every parameter from the start and writes only that shard."""
    folder = None
    if weights_from not in (None, 'scratch'):
        folder = local_folder(weights_from)  # a download, if any, before anything is built
    construct = contextlib.nullcontext()
    if zero3_config:
        import deepspeed
        construct = deepspeed.zero.Init(config_dict_or_path=zero3_config)
    with large_blocks_returned():
        with construct:
            model = GPT(config, init=False)
        if weights_from == 'scratch':
            with torch.random.fork_rng(devices=[]):  # every rank draws alike, whatever it drew before
                torch.manual_seed(seed)
                model.init_weights(write=write_blocks)
        elif folder:
            load_pretrained(model, folder)
    return model


@contextlib.contextmanager
def large_blocks_returned():
    """Inside, glibc's malloc gives every block of 1 MiB or more a mapping of its own, returned to the system
    when it is freed. A build makes a whole tensor, keeps a part and frees the rest, tensor after tensor: in
    the heap those holes stayed resident (60-200 MiB beyond a gpt2-medium shard per rank, differing run to
    run). After, the thresholds are where glibc's own adjustment ends up (32 MiB, and twice that for the
    heap's top), so what comes next reuses freed memory as before."""
    set_malloc(2**20)
    try:
        yield
    finally:
        set_malloc(32 * 2**20, 64 * 2**20)


def write_blocks(p, block, rows_per_block):
    """GPT.init_weights' writer: draws only the blocks of rows this process keeps (its shard under ZeRO-3)."""
    first, end = rows_kept(p)
    for k in range(first // rows_per_block, -(-end // rows_per_block)):
        write_rows(p, block(k), k * rows_per_block)


def rows_kept(p):
    """[first, end): the rows of p's whole value (in its own layout) that this process keeps some of."""
    dest, start = shard(p)
    per_row = row_elements(p)
    return start // per_row, min(full_shape(p)[0], -(-(start + dest.numel()) // per_row))


def shard(p):
    """(destination, its first element): where this process keeps a parameter's flattened elements. A whole
    parameter: all of them, from 0. Under ZeRO-3 this rank's shard, p.ds_tensor: rank r of the parameter's
    group keeps elements [r * n, (r + 1) * n) of the flattened parameter (the last rank's padded), the layout
    DeepSpeed partitions and gathers by (and its universal checkpoints load by)."""
    if not hasattr(p, 'ds_tensor'):
        return p.data.view(-1), 0
    import torch.distributed as dist
    return p.ds_tensor, p.ds_tensor.numel() * dist.get_rank(group=p.ds_process_group)


def write_rows(p, rows, first_row):
    """Store rows [first_row, first_row + len(rows)) of p's whole value (in p's own layout) where this process
    keeps them: all of them in a whole parameter, the part in this rank's shard under ZeRO-3."""
    dest, start = shard(p)
    lo = first_row * row_elements(p)  # the flat elements these rows hold: [lo, lo + rows.numel())
    a, b = max(lo, start), min(lo + rows.numel(), start + dest.numel())
    if a < b:
        with torch.no_grad():
            dest[a - start:b - start].copy_(rows.reshape(-1)[a - lo:b - lo])


def load_pretrained(model, folder):
    """Copy a transformers GPT-2's weights into model, tensor by tensor (OpenAI's own files name them without
    'transformer.'). ValueError when one is missing or of another shape."""
    files = weight_files(folder)
    keys = {name: stored_key(name, files, folder) for name, _ in model.named_parameters()}  # all, then copy
    for name, p in model.named_parameters():
        key, transposed = keys[name]
        copy_rows(p, files[key], key, transposed, folder)


def copy_rows(p, source, key, transposed, folder):
    """Read the stored tensor key into p, only the rows this process keeps (write_rows), SLICE_BYTES at a
    time: a Conv1D weight transposed (its columns are our rows), of a longer position table the first
    rows. source: a safetensors file's path, or the tensor itself."""
    from safetensors import safe_open
    if isinstance(source, torch.Tensor):
        stored = list(source.shape)
    else:
        with safe_open(source, 'pt') as f:
            stored = f.get_slice(key).get_shape()
    shape = list(full_shape(p))
    wanted = shape[::-1] if transposed else shape  # in the file's layout
    if stored[1:] != wanted[1:] or stored[0] < wanted[0]:
        raise ValueError(f'{folder}: {key} has shape {stored}, config.json says {wanted}')
    first, end = rows_kept(p)
    step = max(1, SLICE_BYTES // (4 * row_elements(p)))
    for r0 in range(first, end, step):
        r1 = min(end, r0 + step)
        if isinstance(source, torch.Tensor):
            write_rows(p, source[:, r0:r1].t() if transposed else source[r0:r1], r0)
            continue
        with safe_open(source, 'pt') as f:  # open for one slice: its mapped pages leave when it closes
            stored_rows = f.get_slice(key)
            write_rows(p, stored_rows[:, r0:r1].t() if transposed else stored_rows[r0:r1], r0)
