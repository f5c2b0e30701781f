"""Every command explains itself. --help (or -h) prints its settings, each with its default and the comment
beside it in the script's settings block (the block is the one source: a new setting documents itself), the
config files made for it and how overrides are written; it exits 0 having loaded and written nothing. A
mistyped key names the nearest one."""
import re
import subprocess
import sys

import pytest
from conftest import REPO, env, one_error, run, sh

# the commands that take --key=value (configurator.py)
KEY_VALUE_COMMANDS = ['train_deepspeed.py', 'sample.py', 'export.py', 'bench.py', 'plot.py',
                      'data/bench_prepare.py']
SETTING = re.compile(r'^([a-z][a-z0-9_]*) = ', re.M)
BLOCK_ENDS = re.compile(r'^(from configurator import configure|def |if __name__)', re.M)


def block_keys(script):
    """The settings a script's source sets above the point where it applies overrides, read by a regex (not
    by the configurator's own parser, which the help output comes from)."""
    source = open(f'{REPO}/{script}').read()
    return SETTING.findall(source[:BLOCK_ENDS.search(source).start()])


def helped(*args):
    proc = run([sys.executable, *args], merge_stderr=False, timeout=60)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr
    return proc.stdout


@pytest.mark.parametrize('script', KEY_VALUE_COMMANDS)
def test_help_lists_the_settings_block(script):
    shown = helped(script, '--help')
    assert re.findall(r'^  --(\w+)=', shown, re.M) == block_keys(script)
    assert f'usage: python {script} [CONFIG_FILE ...] [--key=value ...]' in shown
    assert helped(script, '-h') == shown


def test_help_shows_defaults_comments_and_config_files():
    shown = helped('train_deepspeed.py', '--help')
    assert re.search(r'^  --eval_interval=5 +iters between evals', shown, re.M)
    assert re.search(r"^  --dataset='shakespeare' +data/<dataset>", shown, re.M)
    assert '  # AdamW' in shown  # the block's section titles
    assert 'config/train_shakespeare_char_cpu.py  The no-GPU demo' in shown
    assert 'config files' not in helped('sample.py', '--help')  # none is made for it


def test_help_loads_nothing():
    """No torch, no DeepSpeed: the answer comes at once, on a machine where the run could not even start."""
    probe = ("import runpy, sys\nsys.argv = ['train_deepspeed.py', '--help']\n"
             "try:\n    runpy.run_path('train_deepspeed.py', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    proc = run([sys.executable, '-c', probe], merge_stderr=False, timeout=60)
    assert proc.stdout.splitlines()[-1] == 'exit 0 False False', proc.stderr


def test_a_new_setting_documents_itself(tmp_path):
    script = tmp_path / 'my_command.py'
    script.write_text('"""My command."""\nfrom configurator import answer_help\n\nanswer_help(__file__)\n'
                      "new_knob = 3  # how far to turn it, in clicks\n"
                      'from configurator import configure\n\nconfigure(globals())\nprint(new_knob)\n')
    environ = env(PYTHONPATH=REPO)
    shown = subprocess.run([sys.executable, str(script), '--help'], env=environ, capture_output=True,
                           text=True)
    assert re.search(r'^  --new_knob=3 +how far to turn it, in clicks$', shown.stdout, re.M)
    typo = subprocess.run([sys.executable, str(script), '--new_knb=4'], env=environ, capture_output=True,
                          text=True)
    assert one_error(typo) == "error: unknown key 'new_knb': did you mean new_knob? (--help lists them all)"


@pytest.mark.parametrize('script, typo, meant', [('sample.py', '--temprature=0.5', 'temperature'),
                                                 ('export.py', '--export_dri=x', 'export_dir'),
                                                 ('bench.py', '--iter=3', 'iters'),
                                                 ('plot.py', '--outdir=x', 'out_dir')])
def test_a_typo_names_the_key_meant(script, typo, meant):
    line = one_error(run([sys.executable, script, typo], timeout=60))
    assert f'did you mean {meant}?' in line


def test_prepare_help_and_typo():
    shown = helped('data/prepare.py', '--help')
    for option in ('--name', '--tokenizer', '--val_fraction', '--seed', '--num_proc', '--text_field',
                   '--force'):
        assert option in shown
    assert '(default: 0.1)' in shown  # --val_fraction's
    line = one_error(run([sys.executable, 'data/prepare.py', 'x.txt', '--nme', 'mydata'], timeout=60))
    assert 'did you mean --name?' in line


def test_a_flag_without_its_value_says_how_to_write_it():
    assert "'--dry_run': overrides are written --dry_run=True" in one_error(run(
        [sys.executable, 'train_deepspeed.py', '--dry_run'], timeout=60))
    assert 'did you mean --cpu-demo?' in one_error(sh('--cpu_demo'))  # the launcher script's own option


def test_launcher_script_help_without_a_gpu():
    proc = sh('--help')
    assert proc.returncode == 0 and 'error' not in proc.stdout
    for option in ('--cpu-demo', '--dry-run', '--num_gpus N', '--hostfile FILE', '--node_rank N',
                   '--master_addr ADDR', '--master_port PORT', 'python train_deepspeed.py --help'):
        assert option in proc.stdout
    assert 'No GPU visible' not in proc.stdout  # the usage, not the no-GPU path
