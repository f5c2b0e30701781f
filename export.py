"""
Turn a DeepSpeed checkpoint into files that load anywhere. One process, no launcher, no GPU needed.
$ python export.py --out_dir=out-shakespeare-xl-deepspeed --export_dir=gpt2-xl-shakespeare [--tag=iter_10]
writes into export_dir:
  ckpt.pt                          fp32 weights, model_args and the run's config, for model.py and sample.py
  config.json, model.safetensors   a transformers GPT2LMHeadModel folder (from_pretrained(export_dir))
  vocab.json, merges.txt, ...      GPT-2's tokenizer, for runs on GPT-2 BPE tokens
  meta.pkl                         the character vocabulary, for character-level runs
Any ZeRO stage (0-3), any number of ranks, fp32/bf16/fp16 runs. ZeRO 1-3 shards are merged by DeepSpeed's
own deepspeed.utils.zero_to_fp32, which reads the fp32 master weights, not the 16-bit working copies.
"""
import os
import shutil
import sys

import torch

import checkpoints
import data_sources
from model import GPT, GPTConfig

out_dir = 'out-shakespeare-xl-deepspeed'  # the run's out_dir (a tag folder inside it works too)
tag = ''  # e.g. 'iter_10'; empty: the tag that out_dir/latest names
export_dir = ''  # where to write; empty: <out_dir>-<tag>. It must not hold anything yet


def model_state_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith('model_states.pt')) if os.path.isdir(folder) else []


def find_checkpoint(out_dir, tag=''):
    """(out_dir, tag) of a saved checkpoint, or a one-line error that names what exists. A tag folder given
    as out_dir is understood (pointing one level too deep is the classic zero_to_fp32 mistake, DeepSpeed#1793)."""
    if not os.path.isdir(out_dir):
        raise SystemExit(f'error: {out_dir} not found: --out_dir is the folder the run saved into')
    if not tag and model_state_files(out_dir):
        out_dir, tag = os.path.split(os.path.abspath(out_dir))
    tags = sorted(d for d in os.listdir(out_dir) if not d.endswith(('.partial', '.old'))  # a killed save's remains
                  and model_state_files(os.path.join(out_dir, d)))
    if not tag:
        latest = os.path.join(out_dir, 'latest')
        if not os.path.isfile(latest):
            raise SystemExit(f"error: {out_dir} has no 'latest' file: name a checkpoint with --tag (found: {', '.join(tags) or 'none'})")
        tag = open(latest).read().strip()
    folder = tag if tag in tags else checkpoints.loadable_folder(out_dir, tag)  # <tag>.old after a kill mid-swap
    if not folder:
        raise SystemExit(f"error: no checkpoint '{tag}' in {out_dir}: its checkpoints are {', '.join(tags) or 'none'}")
    return out_dir, folder


def consolidate(out_dir, tag):
    """The model in fp32 on CPU, and the client state saved with it (model_args, config, iter_num, ...)."""
    tag_dir = os.path.join(out_dir, tag)
    saved = torch.load(os.path.join(tag_dir, model_state_files(tag_dir)[0]), map_location='cpu', mmap=True,
                       weights_only=False)
    if 'model_args' not in saved:
        raise SystemExit(f'error: {tag_dir} was not saved by train_deepspeed.py (no model_args in it)')
    model = GPT(GPTConfig(**saved['model_args']))
    stage = saved['ds_config'].get('zero_optimization', {}).get('stage', 0)
    universal = os.path.join(tag_dir, 'zero')
    if os.path.isdir(universal):  # made by ds_to_universal: one flat fp32 file per parameter, any stage
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        state_dict = {n: torch.load(os.path.join(universal, n, 'fp32.pt'), map_location='cpu', weights_only=True)
                      .view(shapes[n]) for n in shapes if os.path.isdir(os.path.join(universal, n))}
    elif stage == 0:
        state_dict = stage0_state_dict(saved, model)
    else:
        os.environ.setdefault('DS_ACCELERATOR', 'cuda' if torch.cuda.is_available() else 'cpu')
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state_dict = get_fp32_state_dict_from_zero_checkpoint(out_dir, tag)
    # lm_head and wte are one tensor; a state dict that names it once (DeepSpeed#1896) must still load
    state_dict.setdefault('lm_head.weight', state_dict['transformer.wte.weight'])
    state_dict.setdefault('transformer.wte.weight', state_dict['lm_head.weight'])
    if not torch.equal(state_dict['lm_head.weight'], state_dict['transformer.wte.weight']):
        raise SystemExit(f'error: {tag_dir}: the tied lm_head and wte weights differ, the checkpoint is inconsistent')
    model.load_state_dict(state_dict, strict=True)  # any missing or unexpected key raises here
    client = {k: saved[k] for k in ('model_args', 'config', 'iter_num', 'best_val_loss') if k in saved}
    return model.eval(), client


def stage0_state_dict(saved, model):
    """zero_to_fp32 does not read stage 0 (no shards: one file holds everything). fp32 runs keep their weights in
    'module'; 16-bit runs keep fp32 masters in the optimizer, group by group in configure_optimizers' order."""
    module = saved['module']
    state_dict = {k: v.float() for k, v in module.items() if k != 'lm_head.weight'}  # tied: wte's, in consolidate
    masters = (saved.get('optimizer') or {}).get('fp32_groups')
    if masters:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = model.configure_optimizers(0.0, 0.0, (0.9, 0.95)).param_groups  # the grouping the run used
        pairs = [(names[id(p)], w) for group, ws in zip(groups, masters) for p, w in zip(group['params'], ws)]
        if len(pairs) != len(names) or any(not torch.equal(w.to(module[n].dtype), module[n]) for n, w in pairs):
            raise SystemExit('error: the fp32 master weights do not line up with the model: '
                             'configure_optimizers has changed since this checkpoint was saved')
        state_dict.update((n, w.float()) for n, w in pairs)
    return state_dict


def find_vocab(out_dir, client):
    """The run's meta.pkl (character vocabulary), or None for GPT-2 BPE."""
    dataset = client.get('config', {}).get('dataset', '')
    for path in (os.path.join(out_dir, 'meta.pkl'), os.path.join(data_sources.folder(dataset), 'meta.pkl')):
        if dataset and os.path.isfile(path):
            return path
    return None


def save_transformers(model, folder, gpt2_bpe):
    """A folder that transformers.GPT2LMHeadModel.from_pretrained loads: config.json + model.safetensors."""
    from safetensors.torch import save_file
    from transformers import GPT2Config
    c = model.config
    eot = 50256 if gpt2_bpe else None
    GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
               activation_function='gelu_new', layer_norm_epsilon=1e-5, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
               attn_pdrop=c.dropout, tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
               architectures=['GPT2LMHeadModel']).save_pretrained(folder)
    save_file(model.hf_state_dict(), os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    out_dir, tag = find_checkpoint(out_dir, tag)
    export_dir = export_dir or f'{os.path.normpath(out_dir)}-{tag}'
    if os.path.isfile(export_dir) or (os.path.isdir(export_dir) and os.listdir(export_dir)):
        raise SystemExit(f'error: {export_dir} already exists and is not empty: pick a new --export_dir (nothing was written)')
    model, client = consolidate(out_dir, tag)
    meta_path = find_vocab(out_dir, client)
    # write beside, then rename: an interrupted export leaves no half-written export_dir behind
    partial = f'{os.path.normpath(export_dir)}.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    torch.save({'model': model.state_dict(), 'model_args': client['model_args'], 'config': client.get('config', {}),
                'iter_num': client.get('iter_num'), 'best_val_loss': client.get('best_val_loss'),
                'source': os.path.join(os.path.abspath(out_dir), tag)}, os.path.join(partial, 'ckpt.pt'))
    save_transformers(model, partial, gpt2_bpe=meta_path is None)
    if meta_path:
        shutil.copyfile(meta_path, os.path.join(partial, 'meta.pkl'))
    else:
        from tokenizer import write_hf_gpt2_tokenizer
        write_hf_gpt2_tokenizer(partial, model.config.block_size)
    if os.path.isdir(export_dir):
        os.rmdir(export_dir)  # empty, checked above
    os.rename(partial, export_dir)
    print(f"exported {out_dir}/{tag} (iter {client.get('iter_num')}, {model.get_num_params() / 1e6:.2f}M parameters, "
          f"{'character vocabulary' if meta_path else 'GPT-2 BPE'}) to {export_dir}: {', '.join(sorted(os.listdir(export_dir)))}")
    sys.stdout.flush()
