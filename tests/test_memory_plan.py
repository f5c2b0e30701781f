"""memory_plan.py: pure arithmetic, checked against hand sums, DeepSpeed's estimators and autograd's saved
tensors."""
import json
import os

import pytest
import torch

from model import GPT, PRETRAINED_SHAPES, GPTConfig, num_params
from nanogpt_ds import memory_plan as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, H, D = PRETRAINED_SHAPES['gpt2-xl']
XL = GPTConfig(n_layer=L, n_head=H, n_embd=D, vocab_size=50257, block_size=1024)
N_XL, LARGEST_XL = num_params(XL), mp.largest_layer_params(XL)
# config/train_shakespeare_char_cpu.py
DEMO = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=85)


def zero_block(name):
    with open(os.path.join(REPO, name)) as f:
        return json.load(f)['zero_optimization']


def test_largest_layer_is_the_tied_embedding():
    assert LARGEST_XL == 50257 * 1600
    with torch.device('meta'):  # what DeepSpeed's model_to_params finds: the most parameters one module owns
        model = GPT(XL)
    assert LARGEST_XL == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_stage3_falls_with_world_size_and_is_below_stage2(dtype):
    gpus = [mp.model_states_bytes(N_XL, LARGEST_XL, 3, ws, 'none', dtype)[0] for ws in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(gpus, gpus[1:]))
    for ws in (2, 4, 8, 16):
        s1, s2, s3 = (mp.model_states_bytes(N_XL, LARGEST_XL, s, ws, 'none', dtype)[0] for s in (1, 2, 3))
        assert s3 < s2 < s1 < mp.model_states_bytes(N_XL, LARGEST_XL, 0, ws, 'none', dtype)[0]


@pytest.mark.parametrize('dtype', ['float16', 'float32'])
@pytest.mark.parametrize('stage', [1, 2, 3])
def test_offload_moves_model_states_to_the_cpu(stage, dtype):
    # on 2 ranks: from 4 on, a rank's share of the offloaded states is no more than the fp32 model every rank
    # builds before deepspeed.initialize, which is the CPU figure without offload
    states = {off: mp.model_states_bytes(N_XL, LARGEST_XL, stage, 2, off, dtype)
              for off in mp.OFFLOADS[:2 + (stage == 3)]}
    assert states['optimizer'][0] < states['none'][0] and states['optimizer'][1] > states['none'][1]
    if stage == 3:
        assert states['optimizer+params'][0] < states['optimizer'][0]
        assert states['optimizer+params'][1] > states['optimizer'][1]


def test_offload_where_deepspeed_has_none_is_refused():
    for stage, offload in ((0, 'optimizer'), (2, 'optimizer+params'), (4, 'none'), (2, 'nvme')):
        with pytest.raises(ValueError):
            mp.model_states_bytes(N_XL, LARGEST_XL, stage, 4, offload, 'bfloat16')


@pytest.mark.parametrize('world_size', [1, 3, 4, 64])
def test_hand_count_agrees_with_deepspeeds_estimators(world_size):
    """The by-hand categories that fp32 and ZeRO-0/1 rely on give DeepSpeed's own 16-bit figures for
    ZeRO-2/3."""
    for stage in (2, 3):
        for offload in mp.OFFLOADS[:2 + (stage == 3)]:
            by_hand = mp._model_states_by_hand(N_XL, LARGEST_XL, stage, world_size, offload, 'float16')
            assert mp.model_states_bytes(N_XL, LARGEST_XL, stage, world_size, offload, 'float16') == \
                pytest.approx(by_hand, abs=8)  # bytes: the two round differently
    # on one GPU ZeRO shards nothing: stages 0, 1 and 2 hold the same 20 bytes a parameter
    one_gpu = {mp.model_states_bytes(N_XL, LARGEST_XL, s, 1, 'none', 'bfloat16')[0] for s in (0, 1, 2)}
    assert one_gpu == {20 * N_XL}


def test_zero2_gpt2_xl_on_4_gpus_by_hand():
    # 16-bit weights whole on every GPU (3.1 GB); 16-bit and fp32 gradients, fp32 master weights and Adam's
    # m and v (2 + 4 + 4 + 8 bytes) split four ways
    gpu, cpu = mp.model_states_bytes(N_XL, LARGEST_XL, 2, 4, 'none', 'bfloat16')
    assert gpu == pytest.approx(2 * 1.5576e9 + 18 * 1.5576e9 / 4, rel=0.01)  # 10.1 GB
    assert cpu == 4 * N_XL  # each rank builds the fp32 model before deepspeed.initialize
    gpu32, _ = mp.model_states_bytes(N_XL, LARGEST_XL, 2, 4, 'none', 'float32')
    # no 16-bit copies, still a master
    assert gpu32 == pytest.approx(4 * 1.5576e9 + 16 * 1.5576e9 / 4, rel=0.01)


def test_activations_linear_in_micro_batch_and_dropout_and_math_path_add():
    one = mp.activation_bytes(XL, 1, 'float16')
    assert [mp.activation_bytes(XL, b, 'float16') for b in (2, 3, 8)] == [2 * one, 3 * one, 8 * one]
    assert mp.activation_bytes(XL, 1, 'float32') > one
    dropped = GPTConfig(**{**XL.__dict__, 'dropout': 0.1})
    assert mp.activation_bytes(dropped, 1, 'float16') == one + (2 * 48 + 1) * 1024 * 1600  # 1-byte masks
    # the math path keeps the T x T softmax of every head and layer
    attention_matrix = 48 * 25 * 1024 * 1024 * 2
    assert mp.activation_bytes(XL, 1, 'float16', fused_attention=False) == one + attention_matrix


def saved_bytes(module, *inputs):
    """The bytes of the float tensors autograd saves for module(*inputs)'s backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:  # not the token ids
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(saved.values())


@pytest.mark.parametrize('config', [GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=100),
                                    GPTConfig(n_layer=4, n_head=6, n_embd=96, block_size=48, vocab_size=84,
                                              bias=False)])
def test_activations_match_autograds_saved_tensors(config):
    """On CPU, SDPA runs a flash kernel that keeps what the GPU's does (without dropout: with it, the CPU
    takes the math path); count what autograd really saves,
    without gradient checkpointing and with it (each block then keeps its input; the backward pass recomputes
    one block at a time, which holds what a block saves, its input included)."""
    torch.manual_seed(0)
    model = GPT(config).train()
    x, y = torch.randint(0, config.vocab_size, (2, 2, config.block_size))
    # + the logits the training loop holds (fp32 here) and log_softmax backward's two fp32 gradients
    logits = 12 * 2 * config.block_size * config.vocab_size
    measured = saved_bytes(model, x, y) + logits
    assert measured == pytest.approx(mp.activation_bytes(config, 2, 'float32'), rel=0.005)

    model.gradient_checkpointing = True
    block_input = torch.randn(2, config.block_size, config.n_embd, requires_grad=True)
    one_block = saved_bytes(model.transformer.h[0], block_input)
    measured = saved_bytes(model, x, y) + one_block - block_input.nbytes + logits
    planned = mp.activation_bytes(config, 2, 'float32', checkpointing=True)
    assert measured == pytest.approx(planned, rel=0.005)
    assert planned < mp.activation_bytes(config, 2, 'float32') / 2


def test_buffers_from_the_json():
    z2, z3 = zero_block('ds_config_zero2.json'), zero_block('ds_config_zero3.json')
    # reduce bucket, doubled by overlap_comm
    assert mp.buffer_bytes(z2, 2, 'float16', N_XL) == 2 * 200_000_000 * 2
    assert mp.buffer_bytes({**z2, 'overlap_comm': False}, 2, 'float16', N_XL) == 200_000_000 * 2
    assert mp.buffer_bytes({'stage': 2}, 2, 'bfloat16', N_XL) == 500_000_000 * 2  # DeepSpeed's defaults
    # reduce + prefetch buckets
    assert mp.buffer_bytes(z3, 3, 'bfloat16', N_XL) == (50_000_000 + 50_000_000) * 2
    assert mp.buffer_bytes({'zero_optimization': z3}, 3, 'float32', N_XL) == (50_000_000 + 50_000_000) * 4
    # ZeRO-0's all-reduce buffer is no bigger than the model
    assert mp.buffer_bytes(z2, 0, 'float16', 1000) == 2000


def test_v100_headline_plan_is_plausible():
    """4x V100-32GB, gpt2-xl, ZeRO-2, fp16, 1 x 32: users see 15-16 GB in nvidia-smi, which also holds the
    CUDA context and the allocator's cache that the plan leaves out."""
    rows = mp.plan(XL, 1, 32, 4, 'float16', zero_block('ds_config_zero2.json'), 32 * mp.GIB)
    row = next(r for r in rows if (r['stage'], r['offload']) == (2, 'none'))
    assert 12 < row['total_gib'] < 16 and row['fits']
    parts = row['model_states_gib'] + row['activations_gib'] + row['buffers_gib']
    assert row['total_gib'] == pytest.approx(parts)
    assert [(r['stage'], r['offload']) for r in rows] == [(0, 'none'), (1, 'none'), (1, 'optimizer'),
                                                          (2, 'none'), (2, 'optimizer'), (3, 'none'),
                                                          (3, 'optimizer'), (3, 'optimizer+params')]
    assert not rows[0]['fits']  # no ZeRO: 20 bytes a parameter is 29 GiB before any activation
    assert all(r['fits'] is None for r in mp.plan(XL, 1, 32, 4, 'float16', {}))


@pytest.mark.parametrize('gpu_gib', [8, 16, 32, 80])
def test_recommend_keeps_the_global_batch_and_fits(gpu_gib):
    z2 = zero_block('ds_config_zero2.json')
    best = mp.recommend(XL, 128, 4, 'float16', z2, gpu_gib * mp.GIB)
    assert best['micro_batch'] * best['grad_accum'] * 4 == 128
    assert best['fits'] and best['total_gib'] <= gpu_gib
    # micro batch 1: the least activation memory
    smallest = mp.plan(XL, 1, 32, 4, 'float16', z2, gpu_gib * mp.GIB)

    def rank(r):  # less offload first, then ZeRO 0-2 over 3
        return mp.OFFLOADS.index(r['offload']), r['stage'] == 3
    assert not any(r['fits'] for r in smallest if rank(r) < rank(best))
    if best['micro_batch'] < 32:  # and the largest micro batch that fits in that class
        bigger = mp.plan(XL, 2 * best['micro_batch'], 0, 4, 'float16', z2, gpu_gib * mp.GIB)
        assert not any(r['fits'] for r in bigger if rank(r) == rank(best))
    # and the highest stage of those
    same = mp.plan(XL, best['micro_batch'], 0, 4, 'float16', z2, gpu_gib * mp.GIB)
    assert not any(r['fits'] for r in same if rank(r) == rank(best) and r['stage'] > best['stage'])


def test_recommend_gives_up_on_a_tiny_gpu_and_refuses_an_uneven_batch():
    assert mp.recommend(XL, 128, 4, 'float16', {}, 2 * mp.GIB) is None
    with pytest.raises(ValueError):
        mp.recommend(XL, 130, 4, 'float16', {}, 80 * mp.GIB)


def test_format_plan_reads_in_a_terminal():
    text = mp.format_plan(mp.plan(XL, 1, 32, 4, 'float16', {}, 32 * mp.GIB), 'gpt2-xl')
    assert text.splitlines()[0] == 'gpt2-xl' and 'GiB per GPU' in text and ' NO' in text and ' yes' in text
    demo = mp.format_plan(mp.plan(DEMO, 16, 1, 2, 'bfloat16', zero_block('ds_config_zero2.json')))
    assert 'MiB per GPU' in demo and demo.count('\n') == 8 + 2  # header, rule, 8 rows, note


ZERO3, OFFLOAD = '--deepspeed_config=ds_config_zero3.json', '--deepspeed_config=ds_config_zero2_offload.json'
RECOMMENDED_XL = [(24, ' --batch_size=4 --gradient_accumulation_steps=8 ('),
                  (12, f' {ZERO3} --batch_size=1 --gradient_accumulation_steps=32 ('),
                  (10, f' {ZERO3} --batch_size=2 --gradient_accumulation_steps=16 '
                       '--gradient_checkpointing=True ('),
                  (8, f' {OFFLOAD} --batch_size=1 --gradient_accumulation_steps=32 (')]


@pytest.mark.parametrize('gpu_gib,advice', RECOMMENDED_XL)
def test_the_recommendation_names_the_shipped_json_that_runs_it(gpu_gib, advice):
    """gpt2-xl, 128 sequences on 4 GPUs, planned from ds_config_zero2.json: the fastest that fits by the
    stated cost model (no offload, no recomputation, ZeRO-2, the largest micro batch, in that order), as the
    overrides that apply it: another shipped JSON or gradient checkpointing only where needed."""
    with open(os.path.join(REPO, 'ds_config_zero2.json')) as f:
        ds_config = json.load(f)
    text = mp.report(XL, 1, 32, 4, 'bfloat16', ds_config, 2, 'ds_config_zero2.json', gpu_gib * mp.GIB)
    recommended = next(line for line in text.splitlines() if line.startswith('recommended'))
    assert advice in recommended
    assert recommended.count('--deepspeed_config') == advice.count('--deepspeed_config')


def test_a_node_needs_its_ranks_times_what_each_builds():
    """The dry run's host line: under ZeRO 0-2 each rank builds the whole model in fp32 on the host, under
    ZeRO-3 (zero.Init) one tensor at a time; ranks beyond this host's RAM get a warning with the fixes."""
    assert mp.start_host_bytes(N_XL, LARGEST_XL, 2) == 4 * N_XL
    assert mp.start_host_bytes(N_XL, LARGEST_XL, 3) == 4 * LARGEST_XL
    over = mp.host_memory_lines(5.8, 2, ranks_per_node=8, host_ram_gib=32.0, runtime_gib=0.3)
    assert '8 rank(s) x 5.8 GiB = 46.4 GiB' in over[0] and 'this host has 32.0 GiB' in over[0]
    assert over[1].startswith('warning:') and 'fewer ranks per node' in over[1] and 'ZeRO-3' in over[1]
    assert len(mp.host_memory_lines(0.3, 3, ranks_per_node=8, host_ram_gib=32.0, runtime_gib=0.3)) == 1
