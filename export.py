"""
Turn a DeepSpeed checkpoint into files that load anywhere. One process, no launcher, no GPU needed.
$ python export.py --out_dir=out-shakespeare-xl-deepspeed --export_dir=gpt2-xl-shakespeare [--tag=iter_10]
writes into export_dir:
  ckpt.pt                          fp32 weights, model_args and the run's config, for model.py and sample.py
  config.json, model.safetensors   a transformers GPT2LMHeadModel folder (from_pretrained(export_dir))
  vocab.json, merges.txt, ...      GPT-2's tokenizer, for runs on GPT-2 BPE tokens
  meta.json                        the character vocabulary, for character-level runs
Any ZeRO stage (0-3), any number of ranks, fp32/bf16/fp16 runs: consolidate.load_model reads the shards.
"""
from configurator import answer_help

answer_help(__file__)  # --help or -h: the settings below, read from this file, before torch loads
import os
import shutil
import sys

import torch

from nanogpt_ds import consolidate, data_sources
from nanogpt_ds.settings import check_values, die, user_errors

out_dir = 'out-shakespeare-xl-deepspeed'  # the run's out_dir (a tag folder inside it works too)
tag = ''  # e.g. 'iter_10'; empty: the tag that out_dir/latest names
export_dir = ''  # where to write; empty: <out_dir>-<tag>. It must not hold anything yet


def save_transformers(model, folder, gpt2_bpe):
    """A folder that transformers.GPT2LMHeadModel.from_pretrained loads: config.json + model.safetensors."""
    from safetensors.torch import save_file
    from transformers import GPT2Config
    c = model.config
    eot = 50256 if gpt2_bpe else None
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                           n_layer=c.n_layer, n_head=c.n_head, activation_function='gelu_new',
                           layer_norm_epsilon=1e-5, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                           attn_pdrop=c.dropout, tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
                           architectures=['GPT2LMHeadModel'])
    hf_config.save_pretrained(folder)
    save_file(model.hf_state_dict(), os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    with user_errors():
        check_values(globals(), named=('out_dir',))
        out_dir, tag = consolidate.find(out_dir, tag)
    export_dir = export_dir or f'{os.path.normpath(out_dir)}-{tag}'
    taken = os.path.isfile(export_dir) or (os.path.isdir(export_dir) and os.listdir(export_dir))
    if taken:
        die(f'{export_dir} already exists and is not empty: pick a new --export_dir (nothing was written)')
    with user_errors():
        model, client = consolidate.load_model(out_dir, tag)
        meta = data_sources.read_meta(consolidate.vocabulary_of(out_dir, client))  # checked before writing
    # write beside, then rename: an interrupted export leaves no half-written export_dir behind
    partial = f'{os.path.normpath(export_dir)}.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    ckpt = {'model': model.state_dict(), 'model_args': client['model_args'],
            'config': client.get('config', {}), 'iter_num': client.get('iter_num'),
            'best_val_loss': client.get('best_val_loss'),
            'source': os.path.join(os.path.abspath(out_dir), tag)}
    torch.save(ckpt, os.path.join(partial, 'ckpt.pt'))
    save_transformers(model, partial, gpt2_bpe=meta is None)
    if meta:
        data_sources.write_meta(partial, meta)  # JSON, whatever the run kept: an old meta.pkl too
    else:
        from nanogpt_ds.tokenizer import write_hf_gpt2_tokenizer
        write_hf_gpt2_tokenizer(partial, model.config.block_size)
    if os.path.isdir(export_dir):
        os.rmdir(export_dir)  # empty, checked above
    os.rename(partial, export_dir)
    vocabulary = 'character vocabulary' if meta else 'GPT-2 BPE'
    n_params = model.get_num_params(non_embedding=False)
    print(f"exported {out_dir}/{tag} (iter {client.get('iter_num')}, {n_params / 1e6:.2f}M "
          f"parameters, {vocabulary}) to {export_dir}: {', '.join(sorted(os.listdir(export_dir)))}")
    sys.stdout.flush()
