"""
A GPT-2 in one file, in nanoGPT's manner.

Parameter names match Hugging Face's GPT-2 one for one (transformer.h.N.attn.c_attn.weight, ...),
so OpenAI's checkpoints load with a transpose of the Conv1D weights and nothing else. The
activation is GELU with the tanh approximation, which is what GPT-2 ("gelu_new") uses; with it,
our logits match transformers' GPT2LMHeadModel on the same weights.
"""
import functools
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

PRETRAINED_SHAPES = {  # name -> (n_layer, n_head, n_embd), all with vocab 50257 and context 1024
    'gpt2': (12, 12, 768),          # 124M
    'gpt2-medium': (24, 16, 1024),  # 350M
    'gpt2-large': (36, 20, 1280),   # 774M
    'gpt2-xl': (48, 25, 1600),      # 1558M
}
# OpenAI's checkpoints use Conv1D, which stores these Linear weights as (in, out)
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# what a start from the hub downloads: the config and the safetensors weights (GPT-2's repositories also hold
# PyTorch, TF, Flax and ONNX copies)
HUB_FILES = ['config.json', 'model.safetensors', 'model.safetensors.index.json', 'model-*.safetensors']
# GPT-2's activation under the names transformers gives it
TANH_GELU = ('gelu_new', 'gelu_pytorch_tanh')
# GPT.init_weights draws each tensor in blocks of whole rows of about this many numbers (16 MiB in fp32)
INIT_BLOCK_ELEMENTS = 2**22


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has; False is a little faster


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be switched off (PyTorch's cannot, before 2.1 at least)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, 'n_embd must be a multiple of n_head'
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # flash attention on GPU; the causal mask is built into the kernel, so no mask buffer to carry
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout_p if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config, init=True):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        # building draws nothing (init_weights draws every weight), so a seed gives the same model whether it
        # is built whole or, under ZeRO-3, partitioned as it is built (model_init.py)
        with torch.random.fork_rng(devices=[]):
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            ))
        # weight tying, as in GPT-2: the head is made without a weight of its own ('meta'), then given wte's
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device='meta')
        self.lm_head.weight = self.transformer.wte.weight
        # True: keep only each block's input in training and recompute the block in the backward pass
        # (activations of one block instead of n_layer, about a third more compute). Not part of the shape:
        # a checkpoint trained either way loads either way
        self.gradient_checkpointing = False
        if init:  # False: the weights are loaded next (a pretrained model, a checkpoint)
            self.init_weights()

    def init_weights(self, write=None):
        """GPT-2's init: N(0, 0.02) for matmul weights and embeddings, scaled down for the projections that
        feed the residual stream, zero biases, unit LayerNorm gains. Each tensor is drawn in fp32 on the CPU
        in blocks of whole rows (about INIT_BLOCK_ELEMENTS numbers), each block from a generator of its own
        seeded from the global one: the same weights whatever the parameters' device, dtype or partitioning,
        and a process can draw just the rows it keeps. write(p, block, rows_per_block) stores them, block(k)
        being rows [k * rows_per_block, ...) (model_init.py's writes only this rank's shard under ZeRO-3); by
        default every block is copied into p."""
        base_seed = int(torch.randint(2**31, (), device='cpu'))  # so torch.manual_seed decides the model
        for index, (name, p) in enumerate(self.named_parameters()):  # the tied wte/lm_head weight once
            if p.is_meta:  # a model built to be counted (the dry run): nothing to draw into
                continue
            shape = full_shape(p)
            rows_per_block = max(1, INIT_BLOCK_ELEMENTS // row_elements(p))
            block = functools.partial(self._init_block, name, shape, rows_per_block, (base_seed, index))
            if write:
                write(p, block, rows_per_block)
                continue
            with torch.no_grad():
                for k in range(-(-shape[0] // rows_per_block)):
                    p[k * rows_per_block:(k + 1) * rows_per_block].copy_(block(k))

    def _init_block(self, name, shape, rows_per_block, seeds, k):
        """Rows [k * rows_per_block, ...) of the init of parameter name, of the given whole shape."""
        rows = (min(shape[0] - k * rows_per_block, rows_per_block), *shape[1:])
        if name.endswith('.bias'):
            return torch.zeros(rows)
        if len(shape) == 1:  # a LayerNorm's gain
            return torch.ones(rows)
        std = 0.02  # and GPT-2's scaled-down init of the projections that feed the residual stream
        if name.endswith('c_proj.weight'):
            std = 0.02 / math.sqrt(2 * self.config.n_layer)
        base_seed, index = seeds
        generator = torch.Generator().manual_seed(((base_seed * 100_003 + index) * 100_003 + k) % 2**63)
        return torch.empty(rows).normal_(0.0, std, generator=generator)

    def get_num_params(self, non_embedding=True):
        """Parameters counted once each (the tied wte/lm_head weight once). non_embedding=True (nanoGPT's
        default) leaves out the position embeddings, the convention for FLOPs."""
        n = sum(numel(p) for p in self.parameters())  # parameters() already yields a tied tensor once
        return n - numel(self.transformer.wpe.weight) if non_embedding else n

    def forward(self, idx, targets=None):
        b, t = idx.size()
        block_size = self.config.block_size
        assert t <= block_size, f'sequence of {t} tokens, block_size is only {block_size}'
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:  # non-reentrant; the RNG state is replayed, so dropout draws the same masks
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:  # inference: only the last position's logits are needed
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """nanoGPT's: OpenAI's GPT-2 by name ('gpt2' ... 'gpt2-xl', downloaded once into the hub's cache) or a
        folder transformers wrote, with only dropout overridable. Loads whole tensors, one at a time; the
        trainer reads the same files in slices, and under ZeRO-3 only its shard (nanogpt_ds/model_init.py)."""
        override_args = override_args or {}
        assert all(k == 'dropout' for k in override_args), 'only dropout can be overridden'
        config = pretrained_config(model_type)
        config.dropout = override_args.get('dropout', 0.0)
        folder = local_folder(model_type)
        model = cls(config, init=False)
        files = weight_files(folder)
        for name, p in model.named_parameters():
            key, transposed = stored_key(name, files, folder)
            if isinstance(files[key], torch.Tensor):
                stored = files[key]
            else:
                from safetensors import safe_open
                with safe_open(files[key], 'pt') as f:
                    stored = f.get_tensor(key)
            stored = stored.t() if transposed else stored
            if stored.shape != p.shape:
                raise ValueError(f'{folder}: {key} has shape {list(stored.shape)}, config.json says '
                                 f'{list(p.shape)}')
            with torch.no_grad():
                p.copy_(stored)
        return model

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to fine-tune pretrained GPT-2 (1024) on shorter windows."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Extend idx (b, t) by max_new_tokens sampled tokens. Call in model.eval()."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def hf_state_dict(self):
        """The weights under transformers' GPT2LMHeadModel names and layout, the inverse of from_pretrained:
        Conv1D weights transposed, the tied lm_head left to tie_word_embeddings, and zeros for the biases
        a bias=False model lacks (GPT-2 always has them; zero biases compute the same thing)."""
        sd = {k: (p.t() if k.endswith(CONV1D_WEIGHTS) else p).detach().float().contiguous()
              for k, p in self.named_parameters()}  # the tied weight appears once, as transformer.wte.weight
        with torch.device('meta'):
            with_bias = GPT(GPTConfig(**{**self.config.__dict__, 'bias': True}))
        for k, p in with_bias.named_parameters():
            sd.setdefault(k, torch.zeros(p.shape))
        return sd

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type=None, cpu_adam=False):
        """AdamW where every 2-D tensor (matmul weights, embeddings) decays and biases and norms don't.
        device_type: nanoGPT's argument, kept so that its calls work; the fused AdamW below runs on either.
        cpu_adam: DeepSpeed's vectorised CPU AdamW (the same update), for ZeRO's optimizer offload, which
        refuses a torch optimizer (or runs it slowly)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if len(full_shape(p)) >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if len(full_shape(p)) < 2], 'weight_decay': 0.0},
        ]
        if cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds its C++ op on first use (cached)
            return DeepSpeedCPUAdam(groups, lr=learning_rate, betas=betas, adamw_mode=True)
        # fused: one pass over each tensor for the whole update, on CPUs as on GPUs (torch 2.4+): 7.4x the
        # for-loop's speed on a 10.7M model's step on 2 AVX2 cores (docs/performance.md)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)


def full_shape(p):
    """A parameter's shape, also when ZeRO-3 has partitioned it (its own tensor is then an empty shard)."""
    return getattr(p, 'ds_shape', p.shape)


def numel(p):
    """A parameter's number of elements, also when ZeRO-3 has partitioned it."""
    return getattr(p, 'ds_numel', p.numel())


def row_elements(p):
    """Elements in one row of a parameter (its first dimension's step; 1 for a vector), partitioned or not."""
    return numel(p) // full_shape(p)[0]


def num_params(config, non_embedding=False):
    """Exact parameter count from the shape alone (no model built): the planner and the tests use it."""
    d, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    b = 1 if config.bias else 0
    per_layer = (2 * d + 2 * d * b        # ln_1, ln_2
                 + 3 * d * d + 3 * d * b  # c_attn
                 + d * d + d * b          # attn.c_proj
                 + 4 * d * d + 4 * d * b  # c_fc
                 + 4 * d * d + d * b)     # mlp.c_proj
    n = V * d + L * per_layer + d + d * b  # wte (tied with lm_head), blocks, ln_f
    return n if non_embedding else n + T * d


def flops_per_token(config):
    """Training FLOPs per token, forward and backward: 6N for the matmuls with the weights, plus
    12*L*H*Q*T for attention's scores and weighted sum (PaLM paper, appendix B)."""
    N = num_params(config, non_embedding=True)
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    return 6 * N + 12 * L * H * Q * T


# OpenAI's GPT-2 and the folders transformers writes: their shapes, files and weight names. The model's own
# facts: nanoGPT's from_pretrained above and the trainer's sliced reads (nanogpt_ds/model_init.py) share them.
def hf_config(folder):
    """A transformers folder's config.json."""
    with open(os.path.join(folder, 'config.json')) as f:
        return json.load(f)


def is_pretrained_source(init_from):
    """A GPT-2 name from the hub or a folder with a transformers config.json."""
    return init_from in PRETRAINED_SHAPES or os.path.isfile(os.path.join(init_from, 'config.json'))


def pretrained_config(name_or_dir):
    """The shape of a pretrained GPT-2 without its weights: OpenAI's from the table, a transformers folder's
    from its config.json. ValueError for an activation this model does not compute."""
    if name_or_dir in PRETRAINED_SHAPES:
        n_layer, n_head, n_embd = PRETRAINED_SHAPES[name_or_dir]
        return GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    c = hf_config(name_or_dir)
    activation = c.get('activation_function', 'gelu_new')  # OpenAI's; transformers' default too
    if activation not in TANH_GELU:
        raise ValueError(f"{name_or_dir}: activation_function={activation!r}, this model implements GPT-2's "
                         'tanh GELU only')
    return GPTConfig(block_size=c['n_positions'], vocab_size=c['vocab_size'], n_layer=c['n_layer'],
                     n_head=c['n_head'], n_embd=c['n_embd'])


def local_folder(name_or_dir):
    """A folder holding the model's config.json and weights: the folder given, or OpenAI's GPT-2 downloaded
    from the hub (its cache makes that once)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_dir, allow_patterns=HUB_FILES)
    except Exception as e:  # the hub's HTTP errors, OSError, or offline mode's ValueError
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ValueError(f'the weights of {name_or_dir} could not be loaded ({reason}): on a machine online, '
                         f"save them once with GPT2LMHeadModel.from_pretrained('{name_or_dir}')"
                         f'.save_pretrained(DIR), then --init_from=DIR') from None


def weight_files(folder):
    """{tensor name: where it is}: a safetensors file's path, or (an older pytorch_model.bin) the tensor,
    memory-mapped. ValueError when the folder has neither."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):  # sharded
        with open(index) as f:
            return {k: os.path.join(folder, file) for k, file in json.load(f)['weight_map'].items()}
    single = os.path.join(folder, 'model.safetensors')
    if os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, 'pt') as f:
            return dict.fromkeys(f.keys(), single)
    legacy = os.path.join(folder, 'pytorch_model.bin')
    if os.path.isfile(legacy):  # its pages stay resident as they are copied: up to the file's size more
        return torch.load(legacy, map_location='cpu', mmap=True, weights_only=True)
    raise ValueError(f'{folder} has no model.safetensors (nor pytorch_model.bin): write it with '
                     f"transformers' save_pretrained(DIR)")


def stored_key(name, files, folder):
    """(the key our parameter `name` has in weight_files' files, whether it is stored transposed): OpenAI's
    own files name tensors without 'transformer.', and Conv1D stores CONV1D_WEIGHTS as (in, out). ValueError
    when the files lack it."""
    key = name if name in files else name.removeprefix('transformer.')
    if key not in files:
        raise ValueError(f'{folder}: its weights lack {name}')
    return key, name.endswith(CONV1D_WEIGHTS)
