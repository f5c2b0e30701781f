"""model.py: the GPT-2 itself, with nanoGPT's interface (GPT(config), from_pretrained, crop_block_size,
generate, configure_optimizers, get_num_params) and nanoGPT's meaning for each."""
import math

import pytest
import torch

from model import GPT, PRETRAINED_SHAPES, GPTConfig, flops_per_token, num_params

SMALL = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def test_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3  # a fresh model is close to uniform
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None


def test_causal_mask():
    """Changing a later token never changes the logits at earlier positions."""
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50
    la, _ = model(a, a)
    lb, _ = model(b, b)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6)
    assert not torch.allclose(la[0, 10], lb[0, 10])


@pytest.mark.parametrize('name,expected', [('gpt2', 124_439_808), ('gpt2-medium', 354_823_168),
                                           ('gpt2-large', 774_030_080), ('gpt2-xl', 1_557_611_200)])
def test_parameter_counts(name, expected):
    n_layer, n_head, n_embd = PRETRAINED_SHAPES[name]
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, block_size=1024)
    with torch.device('meta'):  # counts without allocating 6 GB for gpt2-xl
        model = GPT(config)
    assert model.get_num_params(non_embedding=False) == expected == num_params(config)
    # nanoGPT's default leaves out the position embeddings
    assert model.get_num_params() == expected - 1024 * n_embd == num_params(config, non_embedding=True)


def test_flops_per_token():
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
    N = 124_439_808 - 1024 * 768
    assert flops_per_token(config) == 6 * N + 12 * 12 * 12 * 64 * 1024


def test_tied_embeddings_and_no_bias():
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8, bias=False))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(not n.endswith('.bias') for n, _ in model.named_parameters())
    assert model.get_num_params(non_embedding=False) == num_params(model.config)


def test_crop_block_size_and_generate():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32) and model.config.block_size == 8
    out = model.generate(torch.zeros((2, 3), dtype=torch.long), max_new_tokens=12, top_k=5)
    assert out.shape == (2, 15)  # longer than block_size: the context is cropped while generating
    with pytest.raises(AssertionError):
        model(torch.zeros((1, 9), dtype=torch.long))


def test_weight_decay_groups():
    model = GPT(SMALL)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')  # nanoGPT passes its device_type
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() == 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() == 1 for p in no_decay['params'])
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == model.get_num_params(False)


def test_from_pretrained_as_nanogpt_calls_it(tmp_path):
    """`from model import GPT; GPT.from_pretrained(...)`, nanoGPT's way to load GPT-2, on a folder that
    transformers wrote (OpenAI's weights are not reachable here; test_model_init.py checks the logits):
    dropout is the one override, and the model then crops and generates as nanoGPT's does."""
    from conftest import tiny_hf
    tiny_hf(tmp_path, n_positions=64)
    model = GPT.from_pretrained(str(tmp_path), dict(dropout=0.1))
    assert model.config.dropout == 0.1 and model.config.block_size == 64 and model.config.vocab_size == 97
    with pytest.raises(AssertionError, match='only dropout'):
        GPT.from_pretrained(str(tmp_path), dict(n_layer=4))
    model.crop_block_size(16)
    assert model.eval().generate(torch.zeros((1, 2), dtype=torch.long), max_new_tokens=20).shape == (1, 22)
    (tmp_path / 'model.safetensors').unlink()
    with pytest.raises(ValueError, match='has no model.safetensors'):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize('bias', [True, False])
def test_hf_state_dict_loads_into_transformers(bias):
    """hf_state_dict is from_pretrained's inverse; a bias=False model gets zero biases and computes the
    same."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, bias=bias)).eval()
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=50)).eval()
    result = hf.load_state_dict(ours.hf_state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {'lm_head.weight'}  # tied to wte
    hf.tie_weights()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert (ours(idx, idx)[0] - hf(idx).logits).abs().max().item() <= 1e-5
