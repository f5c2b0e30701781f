"""Runs saved before the move into nanogpt_ds/ (every module at the top, commit fb68fbf) still resume exactly,
export and sample: tests/data/old_layout holds a ZeRO-2 run and a ZeRO-3 run stopped by SIGTERM, both made by
that layout's trainer (tests/data/old_layout/make.sh says how). What makes that hold: the checkpoints pickle
nothing of ours, only torch, NumPy, DeepSpeed and Python's own types, so no module path is stored in them."""
import json
import os
import pickletools
import shutil
import sys
import zipfile

import pytest
import torch
from conftest import REPO, expected_eval, launch, metrics, ok, run

from model import GPT, GPTConfig

OLD = os.path.join(REPO, 'tests', 'data', 'old_layout')
# make.sh's settings: the resumed runs must use the same ones
OLD_RUN = ['--dataset=shakespeare_char', '--block_size=16', '--batch_size=4',
           '--gradient_accumulation_steps=1', '--dtype=float32', '--eval_iters=2', '--log_interval=1',
           '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4', '--max_iters=8', '--eval_interval=4',
           '--always_save_checkpoint=True']
# every module of ours, at either layout
OURS = ('model', 'configurator', 'nanogpt_ds', 'train_deepspeed', 'checkpoints', 'consolidate',
        'data_sources', 'ds_keys', 'ds_setup', 'hosts', 'memory_plan', 'model_init', 'perf', 'preemption',
        'settings', 'tokenizer', 'plot')


def pickled_modules(path):
    """The top-level modules a torch.save file's pickle imports to load (GLOBAL and STACK_GLOBAL opcodes)."""
    modules = set()
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.endswith('.pkl'):
                continue
            strings = []
            for op, arg, _ in pickletools.genops(z.read(name)):
                if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
                    strings.append(arg)
                elif op.name == 'GLOBAL':
                    modules.add(arg.split(' ')[0].split('.')[0])
                elif op.name == 'STACK_GLOBAL':
                    modules.add(strings[-2].split('.')[0])
    return modules


def checkpoint_files(out_dir):
    return [os.path.join(folder, name) for folder, _, names in os.walk(out_dir) for name in names
            if name.endswith('.pt')]


def losses(records):
    return {r['iter']: r['loss'] for r in records if 'loss' in r}


def test_checkpoints_pickle_nothing_of_ours(saved_run, saved_run_zero3):
    """Old runs' files and today's (ZeRO-2, ZeRO-3; model states, optimizer states, client state): only
    torch, NumPy, DeepSpeed and the standard library are named, so moving a module of ours breaks no load."""
    files = checkpoint_files(OLD) + checkpoint_files(saved_run[0]) + checkpoint_files(saved_run_zero3[0])
    assert len(files) >= 10
    for path in files:
        modules = pickled_modules(path)
        assert modules <= {'torch', 'numpy', 'deepspeed', 'collections', '_codecs', 'builtins'}, path
        assert not modules & set(OURS)


@pytest.mark.launches
def test_an_old_zero2_run_resumes_from_a_named_tag_exactly(tmp_path):
    """From iter_4, not the newest tag (final): the iterations after it log the old run's own losses, bit
    for bit, and the final eval its val loss."""
    out = tmp_path / 'out'
    shutil.copytree(os.path.join(OLD, 'zero2'), out)
    before = metrics(out)
    proc = ok(launch([*OLD_RUN, f'--out_dir={out}', '--init_from=resume', '--resume_tag=iter_4']))
    assert f'resumed at iter 4 from {out / "iter_4"}' in proc.stdout
    after = metrics(out)[len(before):]
    assert losses(after) == {i: loss for i, loss in losses(before).items() if i >= 4}
    assert after[-1]['iter'] == 8 and after[-1]['val_loss'] == before[-1]['val_loss']


@pytest.mark.launches
def test_an_old_zero3_sigterm_save_resumes_exactly(tmp_path):
    """The ZeRO-3 run stopped by SIGTERM after iter 4 (saved as iter_5), resumed to its max_iters: the losses
    of the same run that never stopped."""
    out = tmp_path / 'out'
    shutil.copytree(os.path.join(OLD, 'zero3_sigterm'), out)
    with open(out / 'uninterrupted_metrics.jsonl') as f:
        whole = [json.loads(line) for line in f]
    before = metrics(out)
    proc = ok(launch([*OLD_RUN, '--deepspeed_config=ds_config_zero3.json', f'--out_dir={out}',
                      '--init_from=resume']))
    assert f'resumed at iter 5 from {out / "iter_5"}' in proc.stdout
    after = metrics(out)[len(before):]
    assert losses(after) == {i: loss for i, loss in losses(whole).items() if i >= 5}
    assert after[-1]['val_loss'] == whole[-1]['val_loss']


def test_an_old_run_exports_and_samples(tmp_path):
    """export.py consolidates the old ZeRO-2 run's final tag into weights that reproduce its last eval, and
    sample.py samples from it."""
    out = tmp_path / 'out'
    shutil.copytree(os.path.join(OLD, 'zero2'), out)
    exported = tmp_path / 'export'
    ok(run([sys.executable, 'export.py', f'--out_dir={out}', f'--export_dir={exported}']))
    ckpt = torch.load(exported / 'ckpt.pt', map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']), init=False)
    model.load_state_dict(ckpt['model'])
    got = expected_eval(model.eval(), eval_iters=2, batch_size=4, block_size=16)
    final = metrics(out)[-1]
    assert final['iter'] == 8
    assert got['val'] == pytest.approx(final['val_loss'], abs=1e-5)
    text = ok(run([sys.executable, 'sample.py', '--init_from=resume', f'--out_dir={out}', '--num_samples=1',
                   '--max_new_tokens=30'], merge_stderr=False)).stdout
    assert len(text.strip()) >= 20
