"""
A GPT-2 in one file, in nanoGPT's manner.

Parameter names match Hugging Face's GPT-2 one for one (transformer.h.N.attn.c_attn.weight, ...),
so OpenAI's checkpoints load with a transpose of the Conv1D weights and nothing else. The
activation is GELU with the tanh approximation, which is what GPT-2 ("gelu_new") uses; with it,
our logits match transformers' GPT2LMHeadModel on the same weights.
"""
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

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        # True: keep only each block's input in training and recompute the block in the backward pass
        # (activations of one block instead of n_layer, about a third more compute). Not part of the shape:
        # a checkpoint trained either way loads either way
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that feed the residual stream
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=False):
        """Parameters counted once each (the tied wte/lm_head weight once). non_embedding=True leaves
        out the position embeddings, the convention for FLOPs (nanoGPT's too)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already yields a tied tensor once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

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

    @classmethod
    def from_pretrained(cls, name_or_dir, override_args=None):
        """Load OpenAI's GPT-2 ('gpt2' ... 'gpt2-xl', from the Hugging Face hub) or any folder written by
        transformers' save_pretrained. Only dropout may be overridden: the shape is the checkpoint's
        (crop_block_size shortens the context afterwards)."""
        override_args = override_args or {}
        refused = sorted(set(override_args) - {'dropout'})
        if refused:
            raise ValueError(f'{name_or_dir}: only dropout can be overridden on a pretrained model, not '
                             f"{', '.join(refused)}: its shape is the checkpoint's")
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        c = hf.config
        act = getattr(c, 'activation_function', 'gelu_new')
        if act not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise ValueError(f'{name_or_dir}: activation_function={act!r}, '
                             f"this model implements GPT-2's tanh GELU only")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, bias=True,
                           dropout=override_args.get('dropout', 0.0))
        model = cls(config)
        sd = model.state_dict()
        buffers = ('.attn.bias', '.attn.masked_bias')  # transformers' attention masks, not weights
        sd_hf = {k: v for k, v in hf.state_dict().items() if not k.endswith(buffers)}
        missing = set(sd) - set(sd_hf)
        if missing:
            raise ValueError(f'{name_or_dir}: checkpoint lacks {sorted(missing)[:5]}')
        with torch.no_grad():
            for k in sd:
                w = sd_hf[k]
                sd[k].copy_(w.t() if k.endswith(CONV1D_WEIGHTS) else w)
        return model

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

    def configure_optimizers(self, weight_decay, learning_rate, betas, cpu_adam=False):
        """AdamW where every 2-D tensor (matmul weights, embeddings) decays and biases and norms don't.
        cpu_adam: DeepSpeed's vectorised CPU AdamW (the same update), for ZeRO's optimizer offload, which
        refuses a torch optimizer (or runs it slowly)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        if cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds its C++ op on first use (cached)
            return DeepSpeedCPUAdam(groups, lr=learning_rate, betas=betas, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


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


def pretrained_config(name_or_dir):
    """The shape of a pretrained GPT-2 without its weights (the dry run plans with it): OpenAI's from the
    table, a transformers folder's from its config.json."""
    if name_or_dir in PRETRAINED_SHAPES:
        n_layer, n_head, n_embd = PRETRAINED_SHAPES[name_or_dir]
        return GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    with open(os.path.join(name_or_dir, 'config.json')) as f:
        c = json.load(f)
    return GPTConfig(block_size=c['n_positions'], vocab_size=c['vocab_size'], n_layer=c['n_layer'],
                     n_head=c['n_head'], n_embd=c['n_embd'])


def is_pretrained_source(init_from):
    """A GPT-2 name from the hub or a folder with a transformers config.json."""
    return init_from in PRETRAINED_SHAPES or os.path.isfile(os.path.join(init_from, 'config.json'))


def build_model(init_from, scratch_args, overrides, resumed_args=None):
    """(model, model_args): the model a run starts from and its shape. resumed_args: a checkpoint's shape (its
    weights come from the engine's load); 'scratch': scratch_args; a pretrained source: its weights, the
    context cropped to scratch_args' block_size. ValueError with the fix where the settings disagree."""
    block_size = scratch_args['block_size']
    if resumed_args:
        model = GPT(GPTConfig(**resumed_args))
    elif init_from == 'scratch':
        model = GPT(GPTConfig(**scratch_args))
    elif is_pretrained_source(init_from):
        try:
            model = GPT.from_pretrained(init_from, dict(dropout=scratch_args['dropout']))
        except OSError as e:  # transformers' word for a hub it cannot reach, or a folder without weights
            reason = str(e).splitlines()[0][:160]
            raise ValueError(f'the weights of {init_from} could not be loaded ({reason}): on a machine '
                             f"online, save them once with GPT2LMHeadModel.from_pretrained('{init_from}')"
                             f'.save_pretrained(DIR), then --init_from=DIR') from None
        trained_for = model.config.block_size
        if block_size > trained_for:
            raise ValueError(f'block_size={block_size} is more than {init_from} was trained for '
                             f'({trained_for}): use --block_size={trained_for} or less')
        if block_size < trained_for:
            model.crop_block_size(block_size)
    else:
        names = ', '.join(map(repr, PRETRAINED_SHAPES))
        raise ValueError(f"init_from={init_from!r} is none of 'scratch', 'resume', {names} nor a folder with "
                         f'a transformers config.json')
    c = model.config
    if init_from != 'scratch':  # a pretrained or resumed model keeps its shape
        clash = [f'{k}={overrides[k]}' for k in ('n_layer', 'n_head', 'n_embd', 'bias')
                 if k in overrides and overrides[k] != getattr(c, k)]
        if clash:
            raise ValueError(f"{', '.join(clash)} disagrees with {init_from} (n_layer={c.n_layer}, "
                             f'n_head={c.n_head}, n_embd={c.n_embd}, bias={c.bias}): a pretrained or resumed '
                             f'model keeps its shape; drop the override or use --init_from=scratch')
    if block_size > c.block_size:
        raise ValueError(f'block_size={block_size} is more than the checkpoint was trained with '
                         f'({c.block_size})')
    return model, {k: getattr(c, k) for k in GPTConfig.__dataclass_fields__}
