"""The model a run starts from (nanogpt_ds/model_init.py; nanoGPT's GPT.from_pretrained in model.py):
pretrained weights read tensor by tensor, or in slices, give transformers' logits, its shape is checked
against the settings, and a start holds at most one copy of the weights, under ZeRO-3 only its shard."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import TINY_RUN, launch, ok, tiny_hf

from model import GPT
from nanogpt_ds import model_init
from nanogpt_ds.model_init import build, start_shape

SCRATCH = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=True, dropout=0.0, vocab_size=97)


def logits_agree(ours, hf, tokens):
    idx = torch.randint(0, 97, (2, tokens))
    with torch.no_grad():
        return (ours.eval()(idx, idx)[0] - hf(idx).logits).abs().max().item() <= 1e-5


# head sizes 16, 16, 8 and 6 (n_head 3, 5 and 6 are not powers of two); contexts all shorter than 1024
@pytest.mark.parametrize('n_layer,n_head,n_embd,n_positions', [(2, 2, 32, 64), (3, 3, 48, 40), (1, 5, 40, 24),
                                                               (2, 6, 36, 100)])
def test_from_pretrained_matches_transformers(tmp_path, n_layer, n_head, n_embd, n_positions):
    hf = tiny_hf(tmp_path, n_layer, n_head, n_embd, n_positions)
    ours = GPT.from_pretrained(str(tmp_path))  # nanoGPT's way, as a reader of nanoGPT writes it
    assert (ours.config.block_size, ours.config.vocab_size, ours.config.n_head) == (n_positions, 97, n_head)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert logits_agree(ours, hf, n_positions)
    # a run's shorter context takes the first positions: it computes what transformers does on that context
    shape = start_shape(str(tmp_path), {**SCRATCH, 'block_size': n_positions // 2}, {})
    assert logits_agree(build(shape, str(tmp_path), seed=0), hf, n_positions // 2)


@pytest.mark.parametrize('layout', ['sharded', 'openai_names'])
def test_other_file_layouts_read_in_small_slices(tmp_path, monkeypatch, layout):
    """Several safetensors files with an index, and OpenAI's names (no 'transformer.' prefix, as GPT-2's own
    hub files have them), read a few rows at a time: the same logits."""
    from safetensors.torch import load_file, save_file
    monkeypatch.setattr(model_init, 'SLICE_BYTES', 1000)  # a 32-wide row is 128 bytes: 7 rows a slice
    if layout == 'sharded':
        hf = tiny_hf(tmp_path)
        hf.save_pretrained(tmp_path, max_shard_size='40KB')
        assert (tmp_path / 'model.safetensors.index.json').exists()
    else:
        hf = tiny_hf(tmp_path)
        tensors = load_file(tmp_path / 'model.safetensors')
        openai = {k.removeprefix('transformer.'): v for k, v in tensors.items()}
        save_file(openai, tmp_path / 'model.safetensors')
    assert logits_agree(build(start_shape(str(tmp_path), SCRATCH, {}), str(tmp_path), seed=0), hf, 64)
    assert logits_agree(GPT.from_pretrained(str(tmp_path)), hf, 64)


def test_the_settings_may_not_reshape_a_pretrained_model(tmp_path):
    tiny_hf(tmp_path)
    shape = start_shape(str(tmp_path), {**SCRATCH, 'dropout': 0.2}, {'dropout': 0.2})
    assert shape.dropout == 0.2 and shape.n_embd == 32
    with pytest.raises(ValueError, match=r'n_layer=4 disagrees with .* drop the override'):
        start_shape(str(tmp_path), SCRATCH, {'n_layer': 4})
    with pytest.raises(ValueError, match='block_size=128 is more than .* use --block_size=64 or less'):
        start_shape(str(tmp_path), {**SCRATCH, 'block_size': 128}, {})


def start_peak_mib(out, folder, stage):
    """An evaluation-only start of the transformers model in folder on 2 CPU ranks: each rank's peak resident
    memory when the start is done (run.json, the kernel's high-water mark), in MiB. One sequence a batch:
    the start is measured before any, and the big model's eval (and the matmuls timed for MFU) cost 8x
    less."""
    ok(launch([*TINY_RUN, f'--init_from={folder}', '--dataset=shakespeare', '--block_size=64',
               '--batch_size=1', '--eval_iters=1', '--eval_only=True',
               f'--deepspeed_config=ds_config_zero{stage}.json', f'--out_dir={out}']))
    return json.load(open(out / 'run.json'))['start_peak_rss_mb']


@pytest.fixture(scope='module')
def start_peaks(tmp_path_factory):
    """(model MiB, {(model, stage): each rank's start peak}) of two transformers GPT-2s with GPT-2's
    vocabulary, a tiny one and one of 96M parameters (0.36 GiB): the big one's start under ZeRO-2 and ZeRO-3,
    the tiny one's under ZeRO-2, two at a time (a launch keeps both cores busy only while its ranks run; each
    rank's peak is its own)."""
    folder = tmp_path_factory.mktemp('models')
    tiny_hf(folder / 'tiny', n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    big = tiny_hf(folder / 'big', n_layer=8, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    model_mib = sum(p.numel() for p in big.parameters()) * 4 / 2**20
    del big
    starts = [('big', 2), ('big', 3), ('tiny', 2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        peaks = pool.map(lambda start: start_peak_mib(folder / f'{start[0]}{start[1]}', folder / start[0],
                                                      start[1]), starts)
        return model_mib, dict(zip(starts, peaks))


@pytest.mark.launches
@pytest.mark.parametrize('stage', [2, 3])
def test_a_start_holds_one_copy_and_zero3_only_its_shard(start_peaks, stage):
    """Each rank's peak beyond the same start of a tiny model under ZeRO-2 (the rank's own machinery, which
    ZeRO-3's is more than, so ZeRO-3's beyond is overstated): under ZeRO-2 at most 1.2x the model's fp32
    bytes (one copy, nothing beside it; a transformers model loaded beside ours made 2x), under ZeRO-3 at
    most half of them + 0.25 GiB on 2 ranks (its shard; 3.4x before zero.Init)."""
    model_mib, peaks = start_peaks
    beyond = [b - t for b, t in zip(peaks['big', stage], peaks['tiny', 2])]
    limit = 1.2 * model_mib if stage == 2 else model_mib / 2 + 256
    assert max(beyond) <= limit, (beyond, model_mib)
