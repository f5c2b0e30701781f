"""Every bad input the trainer, its launcher script and the other commands check, in a table each. The
contract for each: ONE line starting 'error:' that names the problem and the fix, a non-zero exit, and out_dir
untouched (here it holds a finished run's checkpoint, which must be byte-for-byte the same afterwards, with no
file added or removed).

The trainer's cases run as plain `python train_deepspeed.py` (a world of one): every check here happens before
training, so the 2-rank launcher would only add start-up time. The 2-rank runs are the finished run itself and
the one that shows the line arriving when rank 0 is late.

Each case is one command of its own, in a folder of its own with its own copy of the finished run. A module
fixture prepares them all (files, copies, models: here, in order) and runs the commands two at a time; each
case's test asserts on its own command's result."""
import concurrent.futures
import functools
import json
import os
import shutil
import sys
import tempfile
from typing import NamedTuple

import numpy as np
import pytest
from conftest import (BIN, REPO, TINY, TINY_RUN, env, launch, one_error, run, selected, sh, slow_rank,
                      snapshot, tiny_hf)

from nanogpt_ds import checkpoints, data_sources

SCRIPT = os.path.join(REPO, 'run_deepspeed_xl.sh')
OFFLINE = env(HF_HUB_OFFLINE='1', HF_HOME=tempfile.mkdtemp())  # no test reaches the hub, none finds a cache


@pytest.fixture(scope='session')
def finished_run(saved_run):
    """out_dir of a real finished 2-rank run: latest -> final, the shards of final and two iter_* tags,
    metrics.jsonl, run.json. Each case changes a copy of it."""
    out = saved_run[0]
    assert checkpoints.latest_tag(str(out)) == 'final' and (out / 'final').is_dir()
    return out


def write(path, text):
    path.write_text(text)
    return path


def ds_json(tmp, **changes):
    """The shipped ZeRO-2 JSON with some keys changed."""
    cfg = json.load(open(os.path.join(REPO, 'ds_config_zero2.json')))
    cfg.update(changes)
    return write(tmp / 'ds.json', json.dumps(cfg))


BROKEN_JSON = '{"zero_optimization": {"stage": 2,}'  # a trailing comma


def folder(path):
    path.mkdir()
    return path


def pretrained(tmp):
    """TINY_RUN (no shape overrides) from a transformers GPT-2 trained for 48 positions."""
    tiny_hf(tmp / 'hf', n_positions=48)
    return [*TINY_RUN, f"--init_from={tmp / 'hf'}"]


def pretrained_without_weights(tmp):
    """A transformers GPT-2 of TINY's shape whose folder has lost its weights: config.json is all there is."""
    tiny_hf(tmp / 'hf', n_embd=64)
    os.remove(tmp / 'hf' / 'model.safetensors')
    return [f"--init_from={tmp / 'hf'}"]


def without_checkpoints(out):
    """A finished run's out_dir with its checkpoints taken away: the metrics and run.json stay."""
    os.remove(out / checkpoints.LATEST)
    for tag in [p for p in out.iterdir() if p.is_dir()]:
        shutil.rmtree(tag)


def without_latest(out):
    """The checkpoint folder 'final' stays, only the pointer to it is gone."""
    os.remove(out / checkpoints.LATEST)


def batch_mismatch_json(tmp):
    """The shipped ZeRO-2 JSON with a batch that the command line's 4 x 8 contradicts."""
    return ds_json(tmp, train_batch_size=16, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=8)


# id -> (set-up: (tmp_path, out_dir copy) -> trainer arguments, phrases the error line must hold)
# The arguments follow TINY and --out_dir=<the copy>, so a later one overrides TINY's.
TRAINER_CASES = {
    'ds_json_does_not_parse': (
        lambda tmp, out: [f"--deepspeed_config={write(tmp / 'ds.json', BROKEN_JSON)}"],
        ['ds.json', 'not valid JSON', 'line 1 column', 'python -m json.tool']),
    'ds_json_missing': (
        lambda tmp, out: [f"--deepspeed_config={tmp / 'nope.json'}"],
        ['nope.json not found', 'ds_config_zero2.json']),
    'ds_json_not_an_object': (  # parses, but is not the object DeepSpeed reads
        lambda tmp, out: [f"--deepspeed_config={write(tmp / 'ds.json', '[2]')}"],
        ['must be a JSON object', 'ds_config_zero2.json']),
    'ds_json_zero_stage_4': (
        lambda tmp, out: [f"--deepspeed_config={ds_json(tmp, zero_optimization={'stage': 4})}"],
        ['zero_optimization.stage=4', '0, 1, 2 or 3']),
    'ds_json_batch_identity': (  # 4 x 8 x 1 rank = 32, not 16
        lambda tmp, out: [f'--deepspeed_config={batch_mismatch_json(tmp)}',
                          '--batch_size=4', '--gradient_accumulation_steps=8'],
        ['train_batch_size=16', '4 x 8 x 1 = 32', '"auto"', '--batch_size']),
    'ds_json_zero3_setting_under_zero2': (  # DeepSpeed would take it and never read it
        lambda tmp, out: ['--deepspeed_config=' + str(ds_json(tmp, zero_optimization={
            'stage': 2, 'stage3_max_live_parameters': 10 ** 9}))],
        ['zero_optimization.stage3_max_live_parameters is read only under ZeRO-3', 'says stage 2',
         '--deepspeed_config=ds_config_zero3.json']),
    'ds_json_offload_at_stage_0': (  # stage 0 builds no ZeRO optimizer: nothing would be offloaded
        lambda tmp, out: ['--deepspeed_config=' + str(ds_json(tmp, zero_optimization={
            'stage': 0, 'offload_optimizer': {'device': 'cpu'}}))],
        ['zero_optimization.offload_optimizer is read only under ZeRO-1, 2 and 3', 'says stage 0',
         '--deepspeed_config=ds_config_zero2_offload.json']),
    'ds_json_zero_key_typo': (  # DeepSpeed too refuses it, with a traceback once the model is built
        lambda tmp, out: ['--deepspeed_config=' + str(ds_json(tmp, zero_optimization={
            'stage': 3, 'stage3_max_live_paramters': 10 ** 9}))],
        ['zero_optimization.stage3_max_live_paramters is not a setting DeepSpeed',
         "did you mean 'stage3_max_live_parameters'?"]),
    'ds_json_optimizer_section': (  # the trainer's own AdamW overrides it
        lambda tmp, out: [f"--deepspeed_config={ds_json(tmp, optimizer={'type': 'AdamW'})}"],
        ['"optimizer" section', 'never uses', '--learning_rate']),
    'unknown_key': (
        lambda tmp, out: ['--max_iter=3'],
        ["unknown key 'max_iter': did you mean max_iters? (--help lists them all)"]),
    'wrong_type_int': (
        lambda tmp, out: ['--max_iters=abc'],
        ["max_iters='abc' is str", 'expected int']),
    'wrong_type_float': (
        lambda tmp, out: ['--learning_rate=True'],
        ['learning_rate=True is bool', 'expected float']),
    'config_file_missing': (
        lambda tmp, out: [str(tmp / 'nope.py')],
        ["nope.py' not found"]),
    'init_from_unknown_name': (
        lambda tmp, out: ['--init_from=gpt3'],
        ["init_from='gpt3'", "'scratch'", "'gpt2-xl'", 'transformers config.json']),
    'init_from_empty_folder': (
        lambda tmp, out: [f"--init_from={folder(tmp / 'empty')}"],
        ['empty', 'transformers config.json']),
    'block_size_beyond_pretrained_context': (  # a transformers GPT-2 trained for 48 positions
        lambda tmp, out: [*pretrained(tmp), '--block_size=64'],
        ['block_size=64 is more than', '(48)', '--block_size=48']),
    'shape_override_of_a_pretrained_model': (  # n_layer agrees with the folder's, n_embd does not
        lambda tmp, out: [*pretrained(tmp), '--n_embd=64', '--n_layer=2'],
        ['n_embd=64 disagrees with', 'n_embd=32', '--init_from=scratch']),
    'fp16_on_cpu': (
        lambda tmp, out: ['--dtype=float16'],
        ["dtype='float16' needs a GPU", '--dtype=bfloat16']),
    'gpu_memory_cap_without_a_gpu': (
        lambda tmp, out: ['--gpu_mem_cap_gb=24'],
        ['gpu_mem_cap_gb=24.0 caps a GPU', 'has none', '--plan_gpu_mem_gb=24']),
    'pretrained_folder_without_weights': (  # a config.json and nothing to load
        lambda tmp, out: pretrained_without_weights(tmp),
        ['has no model.safetensors', 'save_pretrained(DIR)']),
    'resume_without_any_checkpoint': (
        lambda tmp, out: without_checkpoints(out) or ['--init_from=resume'],
        ['nothing to resume', 'latest not found', '--init_from=scratch']),
    'resume_without_latest': (
        lambda tmp, out: without_latest(out) or ['--init_from=resume'],
        ['latest not found', '--resume_tag=final']),
    'resume_tag_that_does_not_exist': (
        lambda tmp, out: ['--init_from=resume', '--resume_tag=iter_7'],
        ['no checkpoint at', 'iter_7', '--resume_tag']),
    'dataset_folder_without_bins': (
        lambda tmp, out: [f"--dataset={folder(tmp / 'nodata')}"],
        ['nodata/train.bin not found', 'prepare.py']),
    'pretrained_weights_out_of_reach': (  # the hub cannot be reached (HF_HUB_OFFLINE=1 in every case here)
        lambda tmp, out: ['--init_from=gpt2', '--n_layer=12', '--n_head=12', '--n_embd=768'],
        ['weights of gpt2 could not be loaded', 'save_pretrained(DIR)', '--init_from=DIR']),
    # numbers of the right type that cannot work: settings.py, whose every rule tests/test_settings.py checks;
    # here the one line it gives a command
    'max_iters_negative': (lambda tmp, out: ['--max_iters=-5'],
                           ['max_iters=-5 cannot work', '--max_iters=1']),
}


# --- the line on 2 ranks (the first test: it runs before any case's command, on cores of its own) ---------

@pytest.mark.launches
def test_the_line_arrives_when_rank_0_is_slower(tmp_path, finished_run):
    """On 2 ranks, rank 0 starting 3 s late: rank 1 finds the problem first (a dataset folder without its
    .bin files, found before the process group, where no rank waits for another) and leaves the line to rank
    0, which still says it once; out_dir stays as it was. A rank 1 that said it and exited at once would have
    the launcher kill rank 0, and the line could come from either. Every check stops a rank through the same
    die() (nanogpt_ds/ds_setup.py), whenever it finds its problem; test_trainer_refuses has every case, on a
    world of one."""
    setup, phrases = TRAINER_CASES['dataset_folder_without_bins']
    out = tmp_path / 'out'
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    proc = launch([*TINY, f'--out_dir={out}', *setup(tmp_path, out)], environ=slow_rank(tmp_path, 0, 3))
    line = one_error(proc)
    assert snapshot(out) == before
    for phrase in phrases:
        assert phrase in line, (phrase, line)


# --- every case, one command each, two at a time ------------------------------------------------------------

class Attempt(NamedTuple):
    proc: object  # the CompletedProcess
    before: dict  # snapshot of out_dir once the case had made its changes, before the command
    after: dict  # and after the command
    out: object  # out_dir
    tmp: object  # the case's own folder


def start(pool, tmp, prepare):
    """prepare() here, in order: the case's files and its out_dir (out, command); then command() in the pool.
    A Future of the Attempt, or of what prepare raised, which only the case's own test reports."""
    try:
        out, command = prepare()
        before = snapshot(out)  # after the case's changes: what the command does to out_dir is what counts
    except Exception as e:
        failed = concurrent.futures.Future()
        failed.set_exception(e)
        return failed
    return pool.submit(lambda: Attempt(command(), before, snapshot(out), out, tmp))


def copy_of(finished_run, tmp):
    out = tmp / 'out'
    shutil.copytree(finished_run, out)
    return out


def trainer_attempt(case, tmp, finished_run):
    setup, _ = TRAINER_CASES[case]
    out = copy_of(finished_run, tmp)
    command = [sys.executable, 'train_deepspeed.py', *TINY, f'--out_dir={out}', *setup(tmp, out)]
    return out, lambda: run(command, timeout=120, environ=OFFLINE)


def fake_gpus(tmp_path, count):
    """An environment whose `python` reports `count` CUDA devices to the script's GPU count and is the
    venv's python otherwise: the script's checks against the GPU count, on a machine without GPUs. The script
    runs from tmp_path/repo, the project's files linked there without .venv, which the script would put first
    on PATH."""
    mirror = tmp_path / 'repo'
    mirror.mkdir()
    for name in os.listdir(REPO):
        if name != '.venv' and name != os.path.basename(SCRIPT):
            os.symlink(os.path.join(REPO, name), mirror / name)
    shutil.copy(SCRIPT, mirror)
    shim = tmp_path / 'fakebin'
    shim.mkdir()
    asks_gpu_count = '[ "$1" = -c ] && [ "$2" = "import torch; print(torch.cuda.device_count())" ]'
    write(shim / 'python', f'#!/bin/sh\n{asks_gpu_count} && {{ echo {count}; exit 0; }}\n'
                           f'exec {sys.executable} "$@"\n').chmod(0o755)
    return dict(env(), PATH=f'{shim}{os.pathsep}{BIN}{os.pathsep}{os.environ["PATH"]}')


# id -> (arguments and environment: (tmp_path) -> (args, environ or None), phrases the error line must hold,
# {tmp} standing for tmp_path).
# Each also gets tiny settings and --max_iters=1, so that a check that stopped working costs a short run, not
# a demo.
LAUNCHER_CASES = {
    'cuda_visible_devices_without_gpus': (
        lambda tmp: ([], dict(env(), CUDA_VISIBLE_DEVICES='0,1')),
        ['CUDA_VISIBLE_DEVICES names GPU 0 but this machine has no GPU', 'unset it', '--cpu-demo']),
    'cuda_visible_devices_beyond_the_gpus': (
        lambda tmp: ([], dict(fake_gpus(tmp, 2), CUDA_VISIBLE_DEVICES='1,2')),
        ['CUDA_VISIBLE_DEVICES names GPU 2 but this machine has 2 GPU(s)', 'from 0 to 1']),
    'num_gpus_beyond_the_gpus': (
        lambda tmp: (['--num_gpus', '8'], fake_gpus(tmp, 4)),
        ['--num_gpus 8', 'has 4 GPU(s)', '--num_gpus 4 or fewer']),
    'num_gpus_beyond_cuda_visible_devices': (
        lambda tmp: (['--num_gpus', '3'], dict(fake_gpus(tmp, 4), CUDA_VISIBLE_DEVICES='0,1')),
        ['--num_gpus 3', 'CUDA_VISIBLE_DEVICES lists 2 GPU(s)', '--num_gpus 2 or fewer']),
    'num_gpus_not_a_number': (
        lambda tmp: (['--cpu-demo', '--num_gpus', 'two'], None),
        ['--num_gpus two', 'whole number']),
    'cpu_demo_ranks_beyond_the_cores': (
        lambda tmp: (['--cpu-demo', '--num_gpus', str(os.cpu_count() + 1)], None),
        [f'--num_gpus {os.cpu_count() + 1}', f'{os.cpu_count()} CPU core(s)',
         f'--num_gpus {os.cpu_count()} or fewer']),
    'ds_json_does_not_parse': (
        lambda tmp: (['--cpu-demo', f"--deepspeed_config={write(tmp / 'ds.json', BROKEN_JSON)}"], None),
        ['DeepSpeed config {tmp}/ds.json is missing or not valid JSON', 'python -m json.tool']),
    'dataset_folder_without_bins': (
        lambda tmp: (['--cpu-demo', f'--dataset={tmp}/nodata'], None),
        ['{tmp}/nodata/train.bin not found: run python data/prepare.py YOUR_FILES --name {tmp}/nodata']),
    'unknown_key': (
        lambda tmp: (['--cpu-demo', '--max_iter=3'], None),
        ["unknown key 'max_iter': did you mean max_iters?"]),
}


def launcher_attempt(case, tmp, finished_run):
    setup, _ = LAUNCHER_CASES[case]
    out = copy_of(finished_run, tmp)
    args, environ = setup(tmp)  # the case's own arguments come last
    script = tmp / 'repo' / os.path.basename(SCRIPT)  # made by fake_gpus
    script = str(script) if script.exists() else SCRIPT
    return out, lambda: sh(*TINY, f'--out_dir={out}', '--max_iters=1', '--eval_iters=1', *args,
                           environ=environ, script=script)


# The other commands: each number or name that cannot work, one line before anything is read or written (the
# sample and export cases name the finished run's copy, which must stay as it was). Each case: (the command
# and its arguments, given the copied out_dir; phrases the line must hold).
COMMAND_CASES = {
    'sample_no_samples': (lambda out: ['sample.py', f'--out_dir={out}', '--num_samples=0'],
                          ['num_samples=0 cannot work', '--num_samples=1']),
    'sample_no_new_tokens': (lambda out: ['sample.py', f'--out_dir={out}', '--max_new_tokens=-3'],
                             ['--max_new_tokens=1']),
    'sample_temperature': (lambda out: ['sample.py', f'--out_dir={out}', '--temperature=0'],
                           ['temperature=0.0 cannot work', 'positive --temperature']),
    'sample_top_k': (lambda out: ['sample.py', f'--out_dir={out}', '--top_k=-5'], ['--top_k=0']),
    'sample_device': (lambda out: ['sample.py', f'--out_dir={out}', '--device=tpu'],
                      ["device='tpu' is no device torch knows", '--device=cpu']),
    'sample_empty_out_dir': (lambda out: ['sample.py', '--out_dir='], ["out_dir='' names nothing"]),
    'sample_prompt_file': (lambda out: ['sample.py', f'--out_dir={out}', '--start=FILE:'],
                           ['--start=FILE:', 'name a UTF-8 text file']),
    'export_empty_out_dir': (lambda out: ['export.py', '--out_dir='], ["out_dir='' names nothing"]),
    'bench_iters': (lambda out: ['bench.py', '--iters=0'], ['--iters=1']),
    'bench_stages': (lambda out: ['bench.py', '--stages=0,5'], ["stages='0,5': 5 cannot work", '0 to 3']),
    'bench_worlds': (lambda out: ['bench.py', '--worlds=two'], ["worlds='two'"]),
    'bench_heads': (lambda out: ['bench.py', '--n_embd=255'], ['--n_embd=252']),
    'bench_dataset': (lambda out: ['bench.py', '--dataset=nope'],
                      ['data/nope/train.bin not found', '--name nope']),
    'plot_empty_out_dir': (lambda out: ['plot.py', ''], ["out_dir='' names nothing"]),
    'prepare_empty_name': (lambda out: ['data/prepare.py', 'README.md', '--name', ''], ['--name is empty']),
    'prepare_typo': (lambda out: ['data/prepare.py', 'README.md', '--nme', 'x'], ['did you mean --name?']),
}

def command_attempt(case, tmp, finished_run):
    out = copy_of(finished_run, tmp)
    command = [sys.executable, *COMMAND_CASES[case][0](out)]
    return out, lambda: run(command, timeout=120, environ=OFFLINE)


ATTEMPTS = {'test_trainer_refuses': trainer_attempt, 'test_launcher_script_refuses': launcher_attempt,
            'test_other_commands_refuse': command_attempt}


@pytest.fixture(scope='module')
def refusals(two_at_a_time, finished_run, tmp_path_factory, request):
    """(test, case) -> Future of the Attempt, for every case of the three tables that this session runs, all
    started at once: each in a folder of its own, against its own copy of the finished run."""
    started = {}
    for test, case in selected(request, ATTEMPTS):
        tmp = tmp_path_factory.mktemp(case)
        prepare = functools.partial(ATTEMPTS[test], case, tmp, finished_run)
        started[test, case] = start(two_at_a_time, tmp, prepare)
    return started


@pytest.mark.parametrize('case', list(TRAINER_CASES))
def test_trainer_refuses(case, refusals):
    proc, before, after, _, _ = refusals['test_trainer_refuses', case].result()
    line = one_error(proc)
    assert after == before
    for phrase in TRAINER_CASES[case][1]:
        assert phrase in line, (phrase, line)


@pytest.mark.parametrize('case', list(LAUNCHER_CASES))
def test_launcher_script_refuses(case, refusals):
    """Exit 1, or 2 for a setting the trainer itself would refuse (the script asks configurator.py)."""
    proc, before, after, _, tmp = refusals['test_launcher_script_refuses', case].result()
    line = one_error(proc)
    assert proc.returncode == (2 if case == 'unknown_key' else 1)
    assert after == before
    assert 'running:' not in proc.stdout  # stopped before anything was launched
    for phrase in LAUNCHER_CASES[case][1]:
        assert phrase.format(tmp=tmp) in line, (phrase, line)


@pytest.mark.parametrize('case', list(COMMAND_CASES))
def test_other_commands_refuse(case, refusals):
    proc, before, after, _, _ = refusals['test_other_commands_refuse', case].result()
    line = one_error(proc)
    assert after == before
    for phrase in COMMAND_CASES[case][1]:
        assert phrase in line, (phrase, line)


# --- without a finished run: out_dir, absent before, stays absent -------------------------------------------

def resume_attempt(case, tmp):
    """--init_from=resume into an out_dir that does not exist."""
    out = tmp / 'never'
    command = [sys.executable, 'train_deepspeed.py', *TINY, f'--out_dir={out}', '--init_from=resume']
    return out, lambda: run(command)


def bad_data_attempt(case, tmp):
    """A copy of Shakespeare's val.bin as both splits, with its vocabulary, spoilt as the case says; or good
    data and an out_dir under a file."""
    char = os.path.join(REPO, 'data', 'shakespeare_char')
    data = tmp / 'data'
    data.mkdir()
    ids = np.fromfile(os.path.join(char, 'val.bin'), dtype=np.uint16)
    for split in ('train', 'val'):
        ids.tofile(data / f'{split}.bin')
    shutil.copy(data_sources.vocabulary_file(char), data)
    out = tmp / 'out'
    if case == 'short':
        ids[:20].tofile(data / 'val.bin')
    elif case == 'odd':
        with open(data / 'train.bin', 'ab') as f:
            f.write(b'\0')
    elif case == 'ids':
        bad = ids.copy()
        bad[1000] = 500
        bad.tofile(data / 'train.bin')
    else:
        (tmp / 'a_file').write_text('')
        out = tmp / 'a_file' / 'out'
    args = [*TINY, f'--dataset={data}', f'--out_dir={out}', '--max_iters=2']
    return out, lambda: run([sys.executable, 'train_deepspeed.py', *args])


FRESH_ATTEMPTS = {'test_resume_from_a_missing_out_dir_creates_nothing': resume_attempt,
                  'test_bad_data_and_out_dir_are_one_line': bad_data_attempt}


@pytest.fixture(scope='module')
def fresh_refusals(two_at_a_time, tmp_path_factory, request):
    """(test, case) -> Future of the Attempt, for each case below that this session runs, all started at
    once."""
    started = {}
    for test, case in selected(request, FRESH_ATTEMPTS):
        tmp = tmp_path_factory.mktemp(case or 'resume')
        started[test, case] = start(two_at_a_time, tmp, functools.partial(FRESH_ATTEMPTS[test], case, tmp))
    return started


def test_resume_from_a_missing_out_dir_creates_nothing(fresh_refusals):
    proc, _, _, out, _ = fresh_refusals['test_resume_from_a_missing_out_dir_creates_nothing', None].result()
    line = one_error(proc)
    assert 'nothing to resume' in line and not out.exists()


@pytest.mark.parametrize('case', ['short', 'odd', 'ids', 'unwritable'])
def test_bad_data_and_out_dir_are_one_line(case, fresh_refusals):
    """Data that cannot be trained on, or an out_dir under a file: the line names the file at fault (a path
    under the case's folder, which TRAINER_CASES' fixed phrases cannot name), and out_dir, absent before,
    stays absent."""
    proc, _, _, out, tmp = fresh_refusals['test_bad_data_and_out_dir_are_one_line', case].result()
    line = one_error(proc)
    data, a_file = tmp / 'data', tmp / 'a_file'
    tokens = len(np.fromfile(os.path.join(REPO, 'data', 'shakespeare_char', 'val.bin'), dtype=np.uint16))
    expected = {'short': f'{data}/val.bin holds 20 tokens, fewer than block_size + 1 = 33',
                'odd': f'{data}/train.bin has {2 * tokens + 1:,} bytes, an odd number',
                'ids': f'{data}/train.bin holds token id 500 (at token 1,000) but the model has 85 ids',
                'unwritable': f'out_dir={out} cannot be written ({a_file} is not a writable folder)'}[case]
    assert expected in line
    assert not out.exists() or case == 'unwritable'
