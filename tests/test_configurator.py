import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from configurator import configure, constants_of, parse_overrides

TRAINER = os.path.join(REPO, 'train_deepspeed.py')
TRAINER_CONSTANTS = constants_of(TRAINER)  # read once: parsing the script's settings block takes a while

DEFAULTS = {'batch_size': 1, 'learning_rate': 3e-5, 'decay_lr': True, 'dataset': 'shakespeare',
            'dtype': 'auto'}


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("import math\nbatch_size = 4\nlearning_rate = 1e-3\n_private = 1\n")
    args = [str(cfg), '--batch_size=8', '--dataset=shakespeare_char', '--local_rank=1']
    out = parse_overrides(args, DEFAULTS)
    assert out == {'batch_size': 8, 'learning_rate': 1e-3, 'dataset': 'shakespeare_char'}


def test_types_are_checked():
    assert parse_overrides(['--learning_rate=1'], DEFAULTS) == {'learning_rate': 1.0}  # an int may be a float
    assert type(parse_overrides(['--learning_rate=1'], DEFAULTS)['learning_rate']) is float
    assert parse_overrides(['--decay_lr=False'], DEFAULTS) == {'decay_lr': False}
    assert parse_overrides(["--dtype='bfloat16'"], DEFAULTS) == {'dtype': 'bfloat16'}
    # a text setting takes the text as written, whatever it would parse as
    texts = parse_overrides(['--dataset=3', '--init_from=0,2'], {**DEFAULTS, 'init_from': 'x'})
    assert texts == {'dataset': '3', 'init_from': '0,2'}
    # ... unless the script lets it take one other type too (train_deepspeed.py: compile='auto' or a bool)
    compile_setting = {'compile': 'auto'}
    assert parse_overrides(['--compile=False'], compile_setting) == {'compile': 'False'}
    assert parse_overrides(['--compile=False'], compile_setting, also={'compile': bool}) == {'compile': False}
    assert parse_overrides(['--compile=auto'], compile_setting, also={'compile': bool}) == {'compile': 'auto'}
    for bad in ('--batch_size=1.5', '--decay_lr=1', '--batch_size=four', '--learning_rate=True',
                "--batch_size='3'"):
        with pytest.raises(ValueError, match='expected'):
            parse_overrides([bad], DEFAULTS)


def test_unknown_key_names_the_nearest(tmp_path):
    nearest = r"^unknown key 'batchsize': did you mean batch_size\? \(--help lists"
    with pytest.raises(ValueError, match=nearest):
        parse_overrides(['--batchsize=2'], DEFAULTS)
    with pytest.raises(ValueError, match=r"^unknown key 'zzz' \(--help lists them all\)$"):  # nothing near it
        parse_overrides(['--zzz=2'], DEFAULTS)
    cfg = tmp_path / 'cfg.py'
    cfg.write_text('max_itters = 5\n')
    with pytest.raises(ValueError, match=f"{cfg}: unknown key 'max_itters'"):
        parse_overrides([str(cfg)], DEFAULTS)
    with pytest.raises(ValueError, match='--key=value'):
        parse_overrides(['--batch_size'], DEFAULTS)
    with pytest.raises(ValueError, match='not found'):
        parse_overrides(['config/nope.py'], DEFAULTS)


def resolved(*args):
    """The trainer's settings after config files and overrides, nothing run: the two calls of
    `python configurator.py train_deepspeed.py ARGS` (test_resolves_the_trainers_constants runs that command),
    in this process. Config files are named from the project's root, as there."""
    settings = copy.deepcopy(TRAINER_CONSTANTS)
    configure(settings, list(args), script=TRAINER)
    return settings


def test_a_setting_follows_the_one_it_is_usually(tmp_path, monkeypatch):
    """lr_decay_iters is max_iters and min_lr learning_rate / 10 unless given, from a config file or the
    command line; given, each keeps its value."""
    monkeypatch.chdir(REPO)
    alone = resolved('--max_iters=2000')
    assert alone['lr_decay_iters'] == 2000 and alone['min_lr'] == 3e-6  # learning_rate was not given
    both = resolved('--max_iters=2000', '--learning_rate=1e-3')
    assert both['lr_decay_iters'] == 2000 and both['min_lr'] == pytest.approx(1e-4)
    given = resolved('--max_iters=2000', '--lr_decay_iters=500', '--learning_rate=1e-3', '--min_lr=0.0')
    assert given['lr_decay_iters'] == 500 and given['min_lr'] == 0.0
    cfg = tmp_path / 'cfg.py'
    cfg.write_text('max_iters = 300\n')
    assert resolved(str(cfg))['lr_decay_iters'] == 300
    demo = resolved('config/train_shakespeare_char_cpu.py', '--max_iters=100')  # the file gives both its own
    assert demo['lr_decay_iters'] == 700 and demo['min_lr'] == 8e-4


def configurator_command(*args):
    """`python configurator.py train_deepspeed.py ARGS`, as the launcher script runs it, started."""
    return subprocess.Popen([sys.executable, 'configurator.py', 'train_deepspeed.py', *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resolves_the_trainers_constants():
    """The command prints the resolved constants as JSON; a bad key is one line on stderr and exit 2."""
    good = configurator_command('config/train_shakespeare_char_cpu.py', '--max_iters=7')
    bad = configurator_command('--max_iter=7')  # at the same time: it loads torch to say its line
    (stdout, stderr), (_, refusal) = good.communicate(timeout=60), bad.communicate(timeout=60)
    assert good.returncode == 0, stderr
    s = json.loads(stdout)
    assert s['max_iters'] == 7 and s['dataset'] == 'shakespeare_char'
    assert s['gradient_accumulation_steps'] == 1
    assert s['learning_rate'] == 8e-3 and s['init_from'] == 'scratch'
    assert bad.returncode == 2 and refusal.count('\n') == 1 and "unknown key 'max_iter'" in refusal, refusal


def test_defaults_are_the_headline_job(monkeypatch):
    """Plain `deepspeed train_deepspeed.py` runs the job of config/train_gpt2_xl_shakespeare.py: the same
    model, data, batch, length, learning rate and evals (the config adds its schedule and logging)."""
    monkeypatch.chdir(REPO)
    defaults, headline = resolved(), resolved('config/train_gpt2_xl_shakespeare.py')
    job = ('init_from', 'dataset', 'deepspeed_config', 'block_size', 'batch_size',
           'gradient_accumulation_steps', 'max_iters', 'learning_rate', 'eval_interval', 'eval_iters',
           'out_dir', 'dtype')
    assert {k: defaults[k] for k in job} == {k: headline[k] for k in job}
