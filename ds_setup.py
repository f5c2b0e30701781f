"""
DeepSpeed set-up that the trainer needs but a reader of its loop does not: resolving the JSON config against
the script's constants, and starting the process group with two fixes for DeepSpeed's CPU backend.
"""
import json
import os
import sys
import time

import deepspeed
import torch.distributed as dist


def resolve_ds_config(path, batch_size, gradient_accumulation_steps, world_size, grad_clip, dtype):
    """(ds_config, zero stage). The JSON gives the ZeRO settings; batch, clipping and precision come from the
    script's constants, so that one place rules: values the JSON states must agree, or ValueError says how."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(path):  # a bare name also finds the JSONs that ship beside this file
        if not os.path.isfile(os.path.join(here, path)):
            shipped = sorted(f for f in os.listdir(here) if f.startswith('ds_config') and f.endswith('.json'))
            raise ValueError(f"DeepSpeed config {path} not found: give the path of a JSON, or one that ships here "
                             f"({', '.join(shipped)}), as --deepspeed_config=...")
        path = os.path.join(here, path)
    try:
        with open(path) as f:
            ds_config = json.load(f)
    except OSError as e:
        raise ValueError(f'cannot read DeepSpeed config {path}: {e.strerror}: make it readable or give another one')
    except json.JSONDecodeError as e:
        raise ValueError(f'DeepSpeed config {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}: '
                         f'fix it there (python -m json.tool {path} shows where)')
    if not isinstance(ds_config, dict) or not isinstance(ds_config.get('zero_optimization', {}), dict):
        raise ValueError(f'DeepSpeed config {path} must be a JSON object whose "zero_optimization" is an object too, '
                         f'like ds_config_zero2.json: rewrite it after that one')
    batch = {'train_micro_batch_size_per_gpu': batch_size, 'gradient_accumulation_steps': gradient_accumulation_steps,
             'train_batch_size': batch_size * gradient_accumulation_steps * world_size}
    stated = {k: ds_config.get(k, 'auto') for k in batch}
    if any(v != 'auto' and v != batch[k] for k, v in stated.items()):
        raise ValueError(
            f"{path} says train_batch_size={stated['train_batch_size']}, micro batch="
            f"{stated['train_micro_batch_size_per_gpu']}, gradient_accumulation_steps={stated['gradient_accumulation_steps']}, "
            f'but train_batch_size must be micro batch x accumulation x world size = {batch_size} x '
            f'{gradient_accumulation_steps} x {world_size} = {batch["train_batch_size"]}: set the three to "auto" '
            f'in the JSON and choose --batch_size / --gradient_accumulation_steps here')
    if ds_config.get('gradient_clipping', 'auto') not in ('auto', grad_clip):
        raise ValueError(f"{path} says gradient_clipping={ds_config['gradient_clipping']}, grad_clip={grad_clip}: "
                         f'set it to "auto" in the JSON and use --grad_clip')
    for block, wanted in (('fp16', dtype == 'float16'), ('bf16', dtype == 'bfloat16')):
        ds_config.setdefault(block, {})
        if ds_config[block].get('enabled', 'auto') not in ('auto', wanted):
            raise ValueError(f'{path} has {block}.enabled={ds_config[block]["enabled"]} but dtype={dtype}: '
                             f'set it to "auto" in the JSON and choose --dtype here')
        ds_config[block]['enabled'] = wanted
    ds_config.update(batch, gradient_clipping=grad_clip)
    stage = ds_config.get('zero_optimization', {}).get('stage', 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise ValueError(f'{path}: zero_optimization.stage={stage!r}, but DeepSpeed has only ZeRO stages 0-3: set '
                         f'"stage" to 0, 1, 2 or 3 there (ds_config_zero2.json and ds_config_zero3.json ship ready)')
    return ds_config, stage


def init_distributed(backend, on_gpu, local_rank):
    """deepspeed.init_distributed, and (rank, world size). On CPU, DeepSpeed JIT-builds a shared-memory
    all-reduce op under a lock file that a killed build leaves behind (every later start then hangs without
    a word), and the op never unlinks its 66 MB /dev/shm buffer per rank and master port."""
    if not on_gpu and local_rank == 0:
        lock = os.path.join(os.environ.get('TORCH_EXTENSIONS_DIR', os.path.expanduser('~/.cache/torch_extensions')),
                            f'py{sys.version_info.major}{sys.version_info.minor}_cpu', 'deepspeed_shm_comm', 'lock')
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 300:
            print(f'warning: {lock} is {(time.time() - os.path.getmtime(lock)) / 60:.0f} min old; if this start '
                  f'hangs, no other DeepSpeed start is running and it is stale: delete it', file=sys.stderr)
    deepspeed.init_distributed(dist_backend=backend)
    rank = dist.get_rank()
    if not on_gpu and 'LOCAL_SIZE' in os.environ:
        # every rank has mapped every buffer once init returns: drop the names now, and the memory goes
        # back when the ranks exit, however they exit (each run used to leak them)
        dist.barrier()
        shm_buffer = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")
        if os.path.exists(shm_buffer):
            os.remove(shm_buffer)
    return rank, dist.get_world_size()
