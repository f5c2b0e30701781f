"""
A saved checkpoint read back as one fp32 model, in one process with no launcher: what export.py and sample.py
start from. Any ZeRO stage, any number of ranks, fp32/bf16/fp16 runs, universal checkpoints; where the files
are is checkpoints.py's to say.
"""
import os

import torch

from model import GPT, GPTConfig
from nanogpt_ds import data_sources
from nanogpt_ds.checkpoints import (
    LATEST,
    complete_tags,
    is_universal,
    latest_tag,
    loadable_folder,
    model_states_file,
    read_checksums,
    read_client_state,
    zero_stage,
)


def find(out_dir, tag=''):
    """(out_dir, folder) of a saved checkpoint: tag, or the one 'latest' names (its .old after a kill
    mid-swap). A tag folder given as out_dir is understood (pointing one level too deep is the classic
    zero_to_fp32 mistake, DeepSpeed#1793). ValueError with what exists when there is none."""
    if not os.path.isdir(out_dir):
        raise ValueError(f'{out_dir} not found: --out_dir is the folder the run saved into')
    if not tag and model_states_file(out_dir):
        out_dir, tag = os.path.split(os.path.abspath(out_dir))
    found = ', '.join(complete_tags(out_dir)) or 'none'
    tag = tag or latest_tag(out_dir)
    if not tag:
        raise ValueError(f"{out_dir} has no '{LATEST}' file: name a checkpoint with --tag (found: {found})")
    folder = loadable_folder(out_dir, tag)
    if not folder:
        raise ValueError(f"no checkpoint '{tag}' in {out_dir}: its checkpoints are {found}")
    return out_dir, folder


def load_model(out_dir, folder):
    """(the model in fp32 on CPU, the client state saved with it: model_args, config, iter_num, ...). Any ZeRO
    stage, any number of ranks, fp32/bf16/fp16 runs; ZeRO 1-3 shards are merged by DeepSpeed's own
    zero_to_fp32, which reads the fp32 master weights, not the 16-bit working copies."""
    tag_dir = os.path.join(out_dir, folder)
    check_every_shard_here(tag_dir)
    saved = read_client_state(tag_dir)
    if 'model_args' not in saved:
        raise ValueError(f'{tag_dir} was not saved by train_deepspeed.py (no model_args in it)')
    model = GPT(GPTConfig(**saved['model_args']), init=False)  # its weights are loaded below
    if is_universal(tag_dir):
        state_dict = universal_state_dict(tag_dir, model)
    elif zero_stage(saved) == 0:
        state_dict = stage0_state_dict(saved, model)
    else:
        os.environ.setdefault('DS_ACCELERATOR', 'cuda' if torch.cuda.is_available() else 'cpu')
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state_dict = get_fp32_state_dict_from_zero_checkpoint(out_dir, folder)
    # lm_head and wte are one tensor; a state dict that names it once (DeepSpeed#1896) must still load
    state_dict.setdefault('lm_head.weight', state_dict['transformer.wte.weight'])
    state_dict.setdefault('transformer.wte.weight', state_dict['lm_head.weight'])
    if not torch.equal(state_dict['lm_head.weight'], state_dict['transformer.wte.weight']):
        raise ValueError(f'{tag_dir}: the tied lm_head and wte weights differ, the checkpoint is '
                         f'inconsistent')
    model.load_state_dict(state_dict, strict=True)  # any missing or unexpected key raises here
    client = {k: saved[k] for k in ('model_args', 'config', 'iter_num', 'best_val_loss') if k in saved}
    return model.eval(), client


def check_every_shard_here(tag_dir):
    """ValueError naming the files the save wrote that tag_dir lacks, and the hosts that hold them: nodes that
    save to disks of their own keep each their own ranks' shards, and merging the weights needs every one."""
    missing = {}  # host -> files
    for name, (_, _, host) in sorted(read_checksums(tag_dir).items()):
        if not os.path.isfile(os.path.join(tag_dir, name)):
            missing.setdefault(host or 'another node', []).append(name)
    if not missing:
        return
    where = '; '.join(f"{', '.join(names)} from {host}" for host, names in missing.items())
    host = next(iter(missing))
    raise ValueError(f'{tag_dir} lacks shards that other nodes saved to their own disks ({where}): copy them '
                     f'in (e.g. rsync -a {host}:{os.path.abspath(tag_dir)}/ {tag_dir}/) and run this again')


def universal_state_dict(tag_dir, model):
    """ds_to_universal's layout: zero/<parameter name>/fp32.pt, flat."""
    state_dict = {}
    for name, tensor in model.state_dict().items():
        path = os.path.join(tag_dir, 'zero', name, 'fp32.pt')
        if os.path.isfile(path):
            state_dict[name] = torch.load(path, map_location='cpu', weights_only=True).view(tensor.shape)
    return state_dict


def stage0_state_dict(saved, model):
    """zero_to_fp32 does not read stage 0 (no shards: one file holds everything). fp32 runs keep their weights
    in 'module'; 16-bit runs keep fp32 masters in the optimizer, group by group in configure_optimizers'
    order."""
    module = saved['module']
    # lm_head is tied to wte: load_model fills it in
    state_dict = {k: v.float() for k, v in module.items() if k != 'lm_head.weight'}
    masters = (saved.get('optimizer') or {}).get('fp32_groups')
    if not masters:
        return state_dict
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.configure_optimizers(0.0, 0.0, (0.9, 0.95)).param_groups  # the grouping the run used
    pairs = [(names[id(p)], w) for group, ws in zip(groups, masters) for p, w in zip(group['params'], ws)]
    every_one = len(pairs) == len(names)
    same_values = all(torch.equal(w.to(module[n].dtype), module[n]) for n, w in pairs)
    if not every_one or not same_values:
        raise ValueError('the fp32 master weights do not line up with the model: configure_optimizers has '
                         'changed since this checkpoint was saved')
    state_dict.update((n, w.float()) for n, w in pairs)
    return state_dict


def vocabulary_of(out_dir, client):
    """The run's vocabulary file (data_sources.vocabulary_file): the copy in out_dir, else its dataset's (a
    mix shares one vocabulary: its first dataset's); None for GPT-2 BPE."""
    dataset = client.get('config', {}).get('dataset')
    if not dataset:
        return None
    first = next(iter(dataset)) if isinstance(dataset, dict) else dataset
    kept = data_sources.vocabulary_file(out_dir)
    return kept or data_sources.vocabulary_file(data_sources.folder(first)) or None
