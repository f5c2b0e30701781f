"""
Sample from a trained model, as nanoGPT's sample.py does. One process: no launcher, no GPU needed.
$ python sample.py --out_dir=out-shakespeare-char-cpu             # a run's newest checkpoint, any ZeRO stage
$ python sample.py --out_dir=out-shakespeare-char-cpu --tag=iter_500
$ python sample.py --init_from=gpt2-xl-shakespeare                 # what export.py wrote (or its ckpt.pt)
$ python sample.py --init_from=gpt2-xl --start="FILE:prompt.txt"   # OpenAI's weights, a transformers folder
"""
from configurator import answer_help

answer_help(__file__)  # --help or -h: the settings below, read from this file, before torch loads
import os
import sys
from contextlib import nullcontext, redirect_stdout

import torch

from model import GPT, GPTConfig, is_pretrained_source

# -----------------------------------------------------------------------------
# 'resume' (out_dir's checkpoint), an export folder or its ckpt.pt, 'gpt2'...'gpt2-xl', a transformers folder
init_from = 'resume'
out_dir = 'out-shakespeare-xl-deepspeed'  # with init_from='resume'
tag = ''  # with init_from='resume': e.g. 'iter_10'; empty: the one out_dir/latest names
start = '\n'  # the prompt, or 'FILE:path' to read it from a file; empty: <|endoftext|> (or the separator)
num_samples = 3
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 samples the model's distribution; lower is more predictable
top_k = 200  # sample among the top_k most likely tokens; 0: all of them
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...
# 'float32', 'bfloat16' or 'float16'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
# -----------------------------------------------------------------------------
from configurator import configure

configure(globals())
from nanogpt_ds import consolidate, data_sources
from nanogpt_ds.settings import DTYPES, check_values, die, user_errors
from nanogpt_ds.tokenizer import load_codec, prompt_ids

with user_errors():  # before a checkpoint is read
    check_values(globals(), at_least={'num_samples': 1, 'max_new_tokens': 1, 'top_k': 0, 'seed': 0},
                 positive={'temperature': 0.8}, named=('init_from', 'out_dir', 'device'),
                 choices={'dtype': DTYPES})
try:
    torch.device(device)
except RuntimeError:
    die(f"device={device!r} is no device torch knows: use --device=cpu, or cuda / cuda:N with a GPU")
if device.startswith('cuda') and not torch.cuda.is_available():
    die(f'device={device!r} but no GPU is visible: use --device=cpu')

meta_path = None
if init_from == 'resume':  # consolidate the ZeRO shards in memory, exactly as export.py does
    with user_errors():
        out_dir, tag = consolidate.find(out_dir, tag)
        with redirect_stdout(sys.stderr):  # zero_to_fp32's progress lines; stdout carries only the samples
            model, client = consolidate.load_model(out_dir, tag)
    meta_path = consolidate.vocabulary_of(out_dir, client)
    source = f"{out_dir}/{tag} (iter {client.get('iter_num')})"
elif init_from.endswith('.pt') or os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
    path = init_from if init_from.endswith('.pt') else os.path.join(init_from, 'ckpt.pt')
    if not os.path.isfile(path):
        die(f'{path} not found: pass a file written by export.py')
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**checkpoint['model_args']), init=False)  # loaded next
    model.load_state_dict(checkpoint['model'])
    meta_path = data_sources.vocabulary_file(os.path.dirname(path))
    source = f"{path} (iter {checkpoint.get('iter_num')})"
elif is_pretrained_source(init_from):
    with user_errors():
        model = GPT.from_pretrained(init_from)  # nanoGPT's way
    meta_path = data_sources.vocabulary_file(init_from)
    source = init_from
else:
    die(f"init_from={init_from!r} is not 'resume', an export folder or .pt file, a GPT-2 name nor a folder "
        f'with a transformers config.json')

with user_errors():
    encode, decode = load_codec(meta_path)
gpt2_bpe = not meta_path
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"--start={start}: cannot read '{start[5:]}' ({e.__class__.__name__}): name a UTF-8 text file")
try:
    start_ids = prompt_ids(encode, start)
except ValueError as e:
    die(f'--start: {e}')

torch.manual_seed(seed)
torch.cuda.manual_seed(seed)
model.eval().to(device)
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device.split(':')[0], dtype=ptdtype)
n_params = model.get_num_params(non_embedding=False)
print(f"{source}: {n_params / 1e6:.2f}M parameters, {'GPT-2 BPE' if gpt2_bpe else meta_path}, "
      f'{device} {dtype}', file=sys.stderr)
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
with torch.no_grad(), ctx:
    for _ in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None)
        print(decode(y[0].tolist()))
        print('---------------')
