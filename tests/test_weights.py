"""Weights in and out, on real 2-rank DeepSpeed runs: fine-tuning a pretrained (transformers) model,
export.py's consolidation of every ZeRO stage, sample.py from each kind of source, resuming on another number
of ranks. Every launch and command the tests read is started by the weights_jobs fixture, three at a time."""
import json
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    TINY_RUN,
    batches_of,
    env,
    expected_eval,
    expected_first_loss,
    launch,
    loss_of,
    metrics,
    ok,
    one_error,
    run,
    tiny_hf,
)

from model import GPT, GPTConfig
from nanogpt_ds import checkpoints, consolidate, data_sources
from nanogpt_ds.tokenizer import EOT_TEXT


def ds_config(folder, stage):
    """The shipped ZeRO-2 JSON with another stage, for stages 0 and 1, which ship no JSON of their own."""
    if stage in (2, 3):
        return f'ds_config_zero{stage}.json'
    cfg = json.load(open(os.path.join(REPO, 'ds_config_zero2.json')))
    cfg['zero_optimization'] = {'stage': stage}
    path = folder / f'ds_config_zero{stage}.json'
    path.write_text(json.dumps(cfg))
    return str(path)


def one_thread():
    """The environment of the single-process commands here, which run beside others (weights_jobs): one
    thread each, as a rank takes its share of the cores. Two processes of two threads on two cores spin in
    each other's OpenMP barriers."""
    return env(OMP_NUM_THREADS='1')


def export(out_dir, export_dir, *args):
    return run([sys.executable, 'export.py', f'--out_dir={out_dir}', f'--export_dir={export_dir}', *args],
               environ=one_thread())


def sample(*args, merge_stderr=True):
    return run([sys.executable, 'sample.py', '--num_samples=2', '--max_new_tokens=40', *args],
               merge_stderr=merge_stderr, environ=one_thread())


def world_of_one(*args):
    """plain `python train_deepspeed.py <args>`: a world of one, no launcher."""
    return run([sys.executable, 'train_deepspeed.py', *args], environ=one_thread())


def sample_text(*args):
    """sample.py's standard output, which holds the samples and nothing else."""
    return ok(sample(*args, merge_stderr=False)).stdout


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob('*')}


def fine_tune(folder):
    """A GPT-2 BPE fine-tune of a tiny random transformers GPT-2 (GPT-2's vocabulary; 3 heads of 16, a
    context of 48 of which the run takes 32) on ZeRO-3 in fp32, 2 iterations of 2 micro batches; its export,
    and samples from the run, the export and the pretrained folder."""
    hf_dir, out, exported = folder / 'hf', folder / 'out', folder / 'export'
    hf = tiny_hf(hf_dir, n_layer=2, n_head=3, n_embd=48, n_positions=48, vocab_size=50257)
    proc = launch([*TINY_RUN, '--dataset=shakespeare', f'--init_from={hf_dir}', f'--out_dir={out}',
                   '--deepspeed_config=ds_config_zero3.json', '--gradient_accumulation_steps=2',
                   '--max_iters=2', '--eval_interval=2'])
    ok(proc)
    ok(export(out, exported))
    texts = [sample_text(*source, '--start=ROMEO:') for source in ([f'--out_dir={out}'],
                                                                     [f'--init_from={exported}'])]
    return dict(hf=hf, hf_dir=hf_dir, out=out, exported=exported, stdout=proc.stdout, texts=texts,
                pretrained_text=sample_text(f'--init_from={hf_dir}', '--start='))


def train_and_export(folder, stage, dtype, saved_run):
    """(out_dir, iters, ranks, export's output, export_dir): a run of 3 iterations in that stage and
    precision, exported; ZeRO-2 fp32 is saved_run's (10 iterations). Stage 0 in fp32 is a world of one (plain
    `python train_deepspeed.py`): rank 0 alone writes its checkpoint, the module and the optimizer whole."""
    if (stage, dtype) == (2, 'float32'):
        out, iters, ranks = saved_run[0], 10, 2
    else:
        out, iters, ranks = folder / 'out', 3, 1 if (stage, dtype) == (0, 'float32') else 2
        args = [*TINY, f'--out_dir={out}', f'--deepspeed_config={ds_config(folder, stage)}',
                f'--dtype={dtype}', '--max_iters=3', '--eval_interval=3']
        ok(world_of_one(*args) if ranks == 1 else launch(args))
    return out, iters, ranks, ok(export(out, folder / 'export')).stdout, folder / 'export'


def export_and_sample(char_run, folder, prompt):
    """char_run exported, and sampled from the export folder and from its ckpt.pt."""
    ok(export(char_run, folder / 'export'))
    return [sample_text(f'--init_from={source}', f'--start=FILE:{prompt}')
            for source in (folder / 'export', folder / 'export' / 'ckpt.pt')]


def tag_folder_then_overwrite(char_run, folder):
    """A tag folder given as out_dir, exported to folder/a, whose iter_num is read; then an export of the run
    into that same, now full, folder."""
    first = export(char_run / 'iter_6', folder / 'a')
    first_iter = torch.load(folder / 'a' / 'ckpt.pt', weights_only=True)['iter_num']
    return first, first_iter, export(char_run, folder / 'a'), folder / 'a'


def resume_on_one_rank(char_run, folder):
    """char_run (ZeRO-3, saved by 2 ranks) copied and resumed on 1 rank: first as it is, by plain `python
    train_deepspeed.py` (a world of one), then, after the conversion its refusal names, by a 1-rank launch
    over the remains of a save killed half-way."""
    out = folder / 'out'
    shutil.copytree(char_run, out)
    before = mtimes(out)
    resume = [*TINY_RUN, f'--out_dir={out}', '--deepspeed_config=ds_config_zero3.json', '--init_from=resume']
    refused = world_of_one(*resume, '--max_iters=12')
    after_refusal = mtimes(out)
    error = one_error(refused)
    # the command the error names, as a user would paste it
    converted = run(shlex.split(error.split('`')[1]), environ=one_thread())
    (out / 'final.partial').mkdir()
    rank_1_file = checkpoints.files_of_rank(str(out / 'final'), 1)[0]
    (out / 'final.partial' / rank_1_file).write_text('junk')
    resumed = launch([*resume, '--resume_tag=final_universal', '--max_iters=12', '--eval_interval=2'],
                     ranks=1)
    return dict(out=out, before=before, after_refusal=after_refusal, error=error, converted=converted,
                resumed=resumed)


def session_tests(request):
    """The ids (name[params]) of this module's tests that this session runs (after -k and -m)."""
    return {item.name for item in request.session.items if item.module is request.module}


STAGES = [(0, 'float32'), (2, 'float32'), (0, 'bfloat16'), (3, 'bfloat16')]


@pytest.fixture(scope='module')
def weights_jobs(request, saved_run, saved_run_zero3, tmp_path_factory):
    """name -> Future of every launch and command this module's tests read, started at once and run three at
    a time, each process of one thread: a launch keeps both cores busy only while its ranks run (the
    runner's and launch.py's start, and the teardown, are one process each), so side by side they take about
    0.6x the time. Only the jobs of the tests that run are started."""
    folder, char_run = tmp_path_factory.mktemp('weights'), saved_run_zero3[0]
    prompt = folder / 'prompt.txt'
    prompt.write_text('ROMEO:\n')

    def mkdir(name):
        (folder / name).mkdir()
        return folder / name

    work = {  # name: (the tests that read it, the job), the longest first
        'resume': (['test_resume_on_another_number_of_ranks'],
                   lambda: resume_on_one_rank(char_run, mkdir('resume'))),
        'fine_tune': (['test_fine_tune_starts_from_the_pretrained_weights',
                       'test_gpt2_bpe_run_exports_a_tokenizer_and_samples'],
                      lambda: fine_tune(mkdir('fine_tune'))),
        **{f'stage{s}_{d}': ([f'test_export_any_stage[{s}-{d}]'],
                             lambda s=s, d=d: train_and_export(mkdir(f'stage{s}_{d}'), s, d, saved_run))
           for s, d in STAGES},
        'from_run': (['test_sample_from_a_run_and_its_export_agree'],
                     lambda: sample_text(f'--out_dir={char_run}', f'--start=FILE:{prompt}')),
        'from_run_seed_7': (['test_sample_from_a_run_and_its_export_agree'],
                            lambda: sample_text(f'--out_dir={char_run}', f'--start=FILE:{prompt}',
                                                '--seed=7')),
        'from_export': (['test_sample_from_a_run_and_its_export_agree'],
                        lambda: export_and_sample(char_run, mkdir('agree'), prompt)),
        'tag_folder': (['test_export_finds_checkpoints_and_refuses_to_overwrite'],
                       lambda: tag_folder_then_overwrite(char_run, mkdir('finds'))),
        'no_such_tag': (['test_export_finds_checkpoints_and_refuses_to_overwrite'],
                        lambda: (export(char_run, folder / 'b', '--tag=iter_3'), folder / 'b')),
        'nowhere': (['test_export_finds_checkpoints_and_refuses_to_overwrite'],
                    lambda: export(folder / 'nowhere', folder / 'c')),
        'unspellable': (['test_export_finds_checkpoints_and_refuses_to_overwrite'],
                        lambda: sample(f'--out_dir={char_run}', '--start=naïve')),
        'empty_prompt': (['test_export_finds_checkpoints_and_refuses_to_overwrite'],
                         lambda: sample_text(f'--out_dir={char_run}', '--start=')),
    }
    running = session_tests(request)
    with ThreadPoolExecutor(max_workers=3) as pool:  # leaving waits for every job started
        yield {name: pool.submit(job) for name, (readers, job) in work.items() if running & {*readers}}


@pytest.mark.launches
def test_fine_tune_starts_from_the_pretrained_weights(weights_jobs):
    """init_from=<transformers folder> on 2 ranks: the run takes the pretrained shape (GPT-2's 50257 ids, not
    a scratch model's 50304), and the first logged loss (before any update) and the step-0 eval are the
    pretrained model's own losses on the same batches, so nothing was re-initialised. ZeRO-3, which
    partitions the loaded module at deepspeed.initialize; ZeRO-2 keeps it whole, as it was loaded."""
    done = weights_jobs['fine_tune'].result()
    hf, out = done['hf'], done['out']
    assert f"{done['hf_dir']} -> " in done['stdout']
    shape = json.load(open(out / 'run.json'))['model_args']
    assert shape == dict(block_size=32, vocab_size=50257, n_layer=2, n_head=3, n_embd=48, dropout=0.0,
                         bias=True)
    records = metrics(out)
    first = next(r for r in records if 'loss' in r)
    assert first['iter'] == 0
    assert abs(first['loss'] - expected_first_loss(hf, 'shakespeare', accumulation=2)) <= 1e-5
    step0 = expected_eval(hf, 'shakespeare')
    assert records[0]['iter'] == 0
    assert abs(records[0]['train_loss'] - step0['train']) <= 1e-5
    assert abs(records[0]['val_loss'] - step0['val']) <= 1e-5
    assert records[-1]['val_loss'] < records[0]['val_loss']  # and it does train


# ZeRO-1 is left out: DeepSpeed writes and reads its checkpoint with ZeRO-2's code (stage_1_and_2.py); ZeRO-3
# in fp32 too: zero_to_fp32 merges its shards as it does bf16's, and test_offload exports a ZeRO-3 fp32 run
@pytest.mark.launches
@pytest.mark.parametrize('stage,dtype', STAGES)
def test_export_any_stage(weights_jobs, stage, dtype):
    """A run of 3 iterations in that stage and precision, exported; ZeRO-2 fp32 is saved_run's (10)."""
    out, iters, ranks, said, exported = weights_jobs[f'stage{stage}_{dtype}'].result()
    assert f'exported {out}/final (iter {iters}' in said
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
    got = expected_eval(model, ranks=ranks)
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


@pytest.mark.launches
def test_sample_from_a_run_and_its_export_agree(weights_jobs):
    """sample.py consolidates a ZeRO-3 run (saved_run_zero3: checkpoints iter_6, iter_8 and final, iter 10) in
    one process; the export of that checkpoint, as a folder and as its ckpt.pt, samples the same text.
    Another seed samples another text."""
    texts = [weights_jobs['from_run'].result(), *weights_jobs['from_export'].result()]
    assert texts[0] == texts[1] == texts[2]
    samples = texts[0].split('---------------\n')
    assert len(samples) == 3 and samples[2] == ''  # two samples, each ended by the separator
    # 40 new characters and a newline, the separator (written as EOT_TEXT) counting as one
    lengths = [len(s.replace(EOT_TEXT, '|')) for s in samples[:2]]
    assert all(s.startswith('ROMEO:\n') for s in samples[:2]) and lengths == [len('ROMEO:\n') + 40 + 1] * 2
    assert samples[0] != samples[1]
    assert weights_jobs['from_run_seed_7'].result() != texts[0]


@pytest.mark.launches
def test_export_finds_checkpoints_and_refuses_to_overwrite(weights_jobs, saved_run_zero3):
    char_run = saved_run_zero3[0]
    # a tag folder given as out_dir (one level too deep) is understood
    first, first_iter, again, folder = weights_jobs['tag_folder'].result()
    assert f'exported {char_run}/iter_6 (iter 6' in ok(first).stdout
    assert first_iter == 6
    # an existing export is never overwritten
    assert 'already exists and is not empty' in one_error(again)
    assert torch.load(folder / 'ckpt.pt', weights_only=True)['iter_num'] == 6
    # a tag that is not there: the ones that are, and nothing written
    proc, folder = weights_jobs['no_such_tag'].result()
    error = one_error(proc)
    assert "no checkpoint 'iter_3'" in error and 'final, iter_6, iter_8' in error
    assert not folder.exists()
    assert 'not found' in one_error(weights_jobs['nowhere'].result())
    # sample.py: a prompt the character vocabulary cannot spell
    assert 'not in the vocabulary' in one_error(weights_jobs['unspellable'].result())
    # an empty prompt starts a document after the vocabulary's separator, as GPT-2 BPE after <|endoftext|>
    assert weights_jobs['empty_prompt'].result().startswith(EOT_TEXT)


@pytest.mark.launches
def test_resume_on_another_number_of_ranks(weights_jobs, saved_run_zero3):
    """ZeRO-3 shards saved by 2 ranks do not load on 1: the trainer stops before training, writes nothing, and
    names the conversion. After it, 1 rank resumes with the very weights saved (its first loss is theirs on
    the batch a fresh stream draws), and trains on."""
    done = weights_jobs['resume'].result()
    out, error = done['out'], done['error']
    assert 'shards for 2 ranks, this run has 1' in error and '--resume_tag=final_universal' in error
    assert done['after_refusal'] == done['before']
    ok(done['converted'])

    proc = ok(done['resumed'])
    assert not (out / 'final.partial').exists() and not (out / 'final.old').exists()
    assert 'resumed at iter 10' in proc.stdout and 'the batch order starts afresh' in proc.stdout
    saved = consolidate.load_model(str(saved_run_zero3[0]), 'final')[0].eval()
    first = [r for r in metrics(out) if 'loss' in r and r['iter'] == 10]
    x, y = batches_of('shakespeare_char', [1337, 0, 10], 'train', 1)[0]  # afresh: [seed, rank, iter]
    assert len(first) == 1 and abs(first[0]['loss'] - loss_of(saved, x, y)) <= 1e-5
    evals = [r for r in metrics(out) if 'val_loss' in r]
    assert evals[-1]['iter'] == 12 and evals[-1]['val_loss'] < evals[-2]['val_loss']
    # the new final is one rank's checkpoint throughout: no shard of the 2-rank save is left in it
    one_rank = checkpoints.files_of_rank(str(out / 'final'), 0)  # ZeRO-3: its model and optimizer states
    assert len(one_rank) == 2 and not checkpoints.files_of_rank(str(out / 'final'), 1)
    assert sorted(os.listdir(out / 'final')) == sorted([checkpoints.CHECKSUMS, *one_rank])
    assert checkpoints.latest_tag(str(out)) == 'final'


@pytest.mark.launches
def test_gpt2_bpe_run_exports_a_tokenizer_and_samples(weights_jobs):
    """test_fine_tune_starts_from_the_pretrained_weights's GPT-2 BPE run: the export carries GPT-2's tokenizer
    for transformers, and sample.py decodes with GPT-2 BPE from the run, the export and the
    pretrained folder."""
    done = weights_jobs['fine_tune'].result()
    assert not data_sources.vocabulary_file(done['out'])
    exported = done['exported']
    assert set(os.listdir(exported)) == {'vocab.json', 'merges.txt', 'tokenizer_config.json', 'config.json',
                                         'model.safetensors', 'ckpt.pt'}
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from nanogpt_ds.tokenizer import gpt2_encoding
    text = 'ROMEO: But, soft! what light through yonder window breaks?\n\n  <|endoftext|>'
    ids = AutoTokenizer.from_pretrained(exported)(text)['input_ids']
    assert ids == gpt2_encoding().encode(text, allowed_special='all')
    assert GPT2LMHeadModel.from_pretrained(exported).config.eos_token_id == 50256
    texts = done['texts']
    assert texts[0] == texts[1] and texts[0].startswith('ROMEO:')
    assert done['pretrained_text'].count('---------------') == 2
