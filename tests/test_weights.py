"""Weights in and out, on real 2-rank DeepSpeed runs: fine-tuning a pretrained (transformers) model,
export.py's consolidation of every ZeRO stage, sample.py from each kind of source."""
import json
import os
import re
import shlex
import shutil
import sys

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    TINY_RUN,
    expected_eval,
    expected_first_loss,
    launch,
    metrics,
    ok,
    one_error,
    run,
    tiny_hf,
)

from model import GPT, GPTConfig
from nanogpt_ds import checkpoints, consolidate, data_sources
from nanogpt_ds.tokenizer import EOT_TEXT


def ds_config(tmp_path, stage):
    """The shipped ZeRO-2 JSON with another stage, for stages 0 and 1, which ship no JSON of their own."""
    if stage in (2, 3):
        return f'ds_config_zero{stage}.json'
    cfg = json.load(open(os.path.join(REPO, 'ds_config_zero2.json')))
    cfg['zero_optimization'] = {'stage': stage}
    path = tmp_path / f'ds_config_zero{stage}.json'
    path.write_text(json.dumps(cfg))
    return str(path)


def export(out_dir, export_dir, *args):
    return run([sys.executable, 'export.py', f'--out_dir={out_dir}', f'--export_dir={export_dir}', *args])


def sample(*args, merge_stderr=True):
    return run([sys.executable, 'sample.py', '--num_samples=2', '--max_new_tokens=40', *args],
               merge_stderr=merge_stderr)


def sample_text(*args):
    """sample.py's standard output, which holds the samples and nothing else."""
    return ok(sample(*args, merge_stderr=False)).stdout


@pytest.mark.launches
def test_fine_tune_starts_from_the_pretrained_weights(tmp_path):
    """init_from=<transformers folder> on 2 ranks: the first logged loss (before any update) and the step-0
    eval are the pretrained model's own losses on the same batches, so nothing was re-initialised. ZeRO-3,
    which partitions the loaded module at deepspeed.initialize; ZeRO-2 keeps it whole, as it was loaded."""
    hf = tiny_hf(tmp_path / 'hf', n_layer=2, n_head=3, n_embd=48, n_positions=48)
    out = tmp_path / 'out'
    proc = ok(launch([*TINY_RUN, f'--init_from={tmp_path / "hf"}', f'--out_dir={out}',
                      '--deepspeed_config=ds_config_zero3.json', '--gradient_accumulation_steps=2',
                      '--max_iters=2', '--eval_interval=2']))
    assert f'{tmp_path / "hf"} -> ' in proc.stdout
    shape = json.load(open(out / 'run.json'))['model_args']
    assert shape == dict(block_size=32, vocab_size=97, n_layer=2, n_head=3, n_embd=48, dropout=0.0, bias=True)
    records = metrics(out)
    first = next(r for r in records if 'loss' in r)
    assert first['iter'] == 0
    assert abs(first['loss'] - expected_first_loss(hf, accumulation=2)) <= 1e-5
    step0 = expected_eval(hf)
    assert records[0]['iter'] == 0
    assert abs(records[0]['train_loss'] - step0['train']) <= 1e-5
    assert abs(records[0]['val_loss'] - step0['val']) <= 1e-5
    assert records[-1]['val_loss'] < records[0]['val_loss']  # and it does train


# ZeRO-1 is left out: DeepSpeed writes and reads its checkpoint with ZeRO-2's code (stage_1_and_2.py); ZeRO-3
# in fp32 too: zero_to_fp32 merges its shards as it does bf16's, and test_offload exports a ZeRO-3 fp32 run
@pytest.mark.parametrize('stage,dtype', [(0, 'float32'), (2, 'float32'), (0, 'bfloat16'), (3, 'bfloat16')])
def test_export_any_stage(tmp_path, saved_run, stage, dtype):
    """A run of 3 iterations in that stage and precision, exported; ZeRO-2 fp32 is saved_run's (10)."""
    exported = tmp_path / 'export'
    zero2_fp32 = stage == 2 and dtype == 'float32'
    if zero2_fp32:
        out, iters = saved_run[0], 10
    else:
        out, iters = tmp_path / 'out', 3
        ok(launch([*TINY, f'--out_dir={out}', f'--deepspeed_config={ds_config(tmp_path, stage)}',
                   f'--dtype={dtype}', '--max_iters=3', '--eval_interval=3']))
    proc = ok(export(out, exported))
    assert f'exported {out}/final (iter {iters}' in proc.stdout
    assert sorted(os.listdir(exported)) == ['ckpt.pt', 'config.json', 'meta.json', 'model.safetensors']

    # (a) ckpt.pt: fp32, every key model.py expects and no other, the tied weight included
    ckpt = torch.load(exported / 'ckpt.pt', map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    assert set(ckpt['model']) == set(model.state_dict())
    model.load_state_dict(ckpt['model'], strict=True)
    model.eval()
    assert torch.equal(ckpt['model']['lm_head.weight'], ckpt['model']['transformer.wte.weight'])
    assert {v.dtype for v in ckpt['model'].values()} == {torch.float32}
    assert ckpt['iter_num'] == iters and ckpt['config']['zero_stage'] == stage

    # the consolidated weights are the trained ones: they reproduce the run's own final eval
    final = metrics(out)[-1]
    assert final['iter'] == iters
    got = expected_eval(model)
    if dtype == 'float32':
        assert abs(got['val'] - final['val_loss']) <= 1e-5 and abs(got['train'] - final['train_loss']) <= 1e-5
    else:  # the run evaluated its bf16 copy; the export holds the fp32 masters, which round to that copy
        assert abs(got['val'] - final['val_loss']) <= 2e-2
        if stage == 0:
            module = checkpoints.read_client_state(str(out / 'final'))['module']
            assert all(torch.equal(ckpt['model'][k].bfloat16(), v) for k, v in module.items())

    # (b) the transformers folder: loads with nothing missing or left over, and computes the same logits
    from transformers import GPT2LMHeadModel
    hf, info = GPT2LMHeadModel.from_pretrained(exported, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    idx = torch.randint(0, 85, (2, 32))
    with torch.no_grad():
        assert (hf.eval()(idx).logits - model(idx, idx)[0]).abs().max().item() <= 1e-5
    assert data_sources.read_meta(str(exported / 'meta.json'))['vocab_size'] == 85


@pytest.fixture
def char_run(saved_run_zero3):
    """A ZeRO-3 character-level run with checkpoints iter_6, iter_8 and final (iter 10): saved_run_zero3."""
    return saved_run_zero3[0]


def test_sample_from_a_run_and_its_export_agree(char_run, tmp_path):
    """sample.py consolidates a ZeRO-3 run in one process; the export of that checkpoint samples the same
    text."""
    ok(export(char_run, tmp_path / 'export'))
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('ROMEO:\n')
    exported = tmp_path / 'export'
    sources = ([f'--out_dir={char_run}'], [f'--init_from={exported}'],
               [f'--init_from={exported / "ckpt.pt"}'])
    texts = [sample_text(*source, f'--start=FILE:{prompt}') for source in sources]
    assert texts[0] == texts[1] == texts[2]
    samples = texts[0].split('---------------\n')
    assert len(samples) == 3 and samples[2] == ''  # two samples, each ended by the separator
    # 40 new characters and a newline, the separator (written as EOT_TEXT) counting as one
    lengths = [len(s.replace(EOT_TEXT, '|')) for s in samples[:2]]
    assert all(s.startswith('ROMEO:\n') for s in samples[:2]) and lengths == [len('ROMEO:\n') + 40 + 1] * 2
    assert samples[0] != samples[1]
    assert sample_text(f'--out_dir={char_run}', '--seed=7') != sample_text(f'--out_dir={char_run}')


def test_export_finds_checkpoints_and_refuses_to_overwrite(char_run, tmp_path):
    # a tag folder given as out_dir (one level too deep) is understood
    proc = ok(export(char_run / 'iter_6', tmp_path / 'a'))
    assert f'exported {char_run}/iter_6 (iter 6' in proc.stdout
    assert torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)['iter_num'] == 6
    # an existing export is never overwritten
    proc = export(char_run, tmp_path / 'a')
    assert 'already exists and is not empty' in one_error(proc)
    assert torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)['iter_num'] == 6
    # a tag that is not there: the ones that are, and nothing written
    error = one_error(export(char_run, tmp_path / 'b', '--tag=iter_3'))
    assert "no checkpoint 'iter_3'" in error and 'final, iter_6, iter_8' in error
    assert not (tmp_path / 'b').exists()
    assert 'not found' in one_error(export(tmp_path / 'nowhere', tmp_path / 'b'))
    # sample.py: a prompt the character vocabulary cannot spell
    assert 'not in the vocabulary' in one_error(sample(f'--out_dir={char_run}', '--start=naïve'))
    # an empty prompt starts a document after the vocabulary's separator, as GPT-2 BPE after <|endoftext|>
    assert sample_text(f'--out_dir={char_run}', '--start=').startswith(EOT_TEXT)


def test_resume_on_another_number_of_ranks(char_run, tmp_path):
    """ZeRO-3 shards saved by 2 ranks do not load on 1: the trainer stops before training, writes nothing, and
    names the conversion. After it, 1 rank resumes with the very weights saved, and trains on."""
    out = tmp_path / 'out'
    shutil.copytree(char_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    resume = [*TINY_RUN, f'--out_dir={out}', '--deepspeed_config=ds_config_zero3.json', '--init_from=resume']
    error = one_error(launch([*resume, '--max_iters=12'], ranks=1))
    assert 'shards for 2 ranks, this run has 1' in error and '--resume_tag=final_universal' in error
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before
    ok(run(shlex.split(error.split('`')[1])))  # the command the error names, as a user would paste it

    proc = ok(launch([*resume, '--resume_tag=final_universal', '--eval_only=True'], ranks=1))
    said = re.search(r'rank 0 of 1 has train loss (\S+), val loss (\S+)', proc.stdout)
    train, val = map(float, said.groups())
    expected = expected_eval(consolidate.load_model(str(out), 'final')[0], ranks=1)
    assert abs(train - expected['train']) <= 1e-5 and abs(val - expected['val']) <= 1e-5

    (out / 'final.partial').mkdir()  # the remains of a save killed half-way: cleared, never mixed in
    rank_1_file = checkpoints.files_of_rank(str(out / 'final'), 1)[0]
    (out / 'final.partial' / rank_1_file).write_text('junk')
    proc = ok(launch([*resume, '--resume_tag=final_universal', '--max_iters=12', '--eval_interval=2'],
                     ranks=1))
    assert not (out / 'final.partial').exists() and not (out / 'final.old').exists()
    assert 'resumed at iter 10' in proc.stdout and 'the batch order starts afresh' in proc.stdout
    evals = [r for r in metrics(out) if 'val_loss' in r]
    assert evals[-1]['iter'] == 12 and evals[-1]['val_loss'] < evals[-2]['val_loss']
    # the new final is one rank's checkpoint throughout: no shard of the 2-rank save is left in it
    one_rank = checkpoints.files_of_rank(str(out / 'final'), 0)  # ZeRO-3: its model and optimizer states
    assert len(one_rank) == 2 and not checkpoints.files_of_rank(str(out / 'final'), 1)
    assert sorted(os.listdir(out / 'final')) == sorted([checkpoints.CHECKSUMS, *one_rank])
    assert checkpoints.latest_tag(str(out)) == 'final'


@pytest.mark.launches
def test_gpt2_bpe_run_exports_a_tokenizer_and_samples(tmp_path):
    """A GPT-2 BPE fine-tune (a tiny pretrained model with GPT-2's vocabulary) on ZeRO-3: the export carries
    GPT-2's tokenizer for transformers, and sample.py decodes with GPT-2 BPE from the run, the export and the
    pretrained folder."""
    tiny_hf(tmp_path / 'hf', n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)
    out, exported = tmp_path / 'out', tmp_path / 'export'
    ok(launch([*TINY_RUN, '--dataset=shakespeare', f'--init_from={tmp_path / "hf"}', f'--out_dir={out}',
               '--deepspeed_config=ds_config_zero3.json', '--max_iters=2', '--eval_interval=2']))
    assert not data_sources.vocabulary_file(out)
    ok(export(out, exported))
    assert set(os.listdir(exported)) == {'vocab.json', 'merges.txt', 'tokenizer_config.json', 'config.json',
                                         'model.safetensors', 'ckpt.pt'}
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from nanogpt_ds.tokenizer import gpt2_encoding
    text = 'ROMEO: But, soft! what light through yonder window breaks?\n\n  <|endoftext|>'
    ids = AutoTokenizer.from_pretrained(exported)(text)['input_ids']
    assert ids == gpt2_encoding().encode(text, allowed_special='all')
    assert GPT2LMHeadModel.from_pretrained(exported).config.eos_token_id == 50256
    sources = ([f'--out_dir={out}'], [f'--init_from={exported}'])
    texts = [sample_text(*source, '--start=ROMEO:') for source in sources]
    assert texts[0] == texts[1] and texts[0].startswith('ROMEO:')
    assert sample_text(f'--init_from={tmp_path / "hf"}', '--start=').count('---------------') == 2
