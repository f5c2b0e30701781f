"""Every command explains itself. --help (or -h) prints its settings, each with its default and the comment
beside it in the script's settings block (the block is the one source: a new setting documents itself), the
config files made for it and how overrides are written; it exits 0 having loaded and written nothing. A
mistyped key names the nearest one. Every command of README.md's Commands table answers --help so.

The commands here that stop on an error line load torch to say it (about 2 s each): the refused fixture runs
them two at a time, and each test reads its own."""
import functools
import os
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


@functools.cache  # several tests read the same answer
def helped(*args):
    """stdout of `python ARGS` (a script and --help or -h): exit 0, nothing on stderr."""
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


TYPOS = [('sample.py', '--temprature=0.5', 'temperature'), ('export.py', '--export_dri=x', 'export_dir'),
         ('bench.py', '--iter=3', 'iters'), ('plot.py', '--outdir=x', 'out_dir')]


@pytest.fixture(scope='module')
def my_command(tmp_path_factory):
    """A new command: a settings block of one setting, then configure(), as every command here has."""
    script = tmp_path_factory.mktemp('new') / 'my_command.py'
    script.write_text('"""My command."""\nfrom configurator import answer_help\n\nanswer_help(__file__)\n'
                      "new_knob = 3  # how far to turn it, in clicks\n"
                      'from configurator import configure\n\nconfigure(globals())\nprint(new_knob)\n')
    return script


@pytest.fixture(scope='module')
def refused(two_at_a_time, my_command):
    """name -> Future of the CompletedProcess (output merged) of each command below that stops on an error
    line, all started at once."""
    commands = {'my_command': ([sys.executable, str(my_command), '--new_knb=4'], env(PYTHONPATH=REPO)),
                **{script: ([sys.executable, script, typo], None) for script, typo, _ in TYPOS},
                'flag_without_value': ([sys.executable, 'train_deepspeed.py', '--dry_run'], None)}
    return {name: two_at_a_time.submit(run, command, timeout=60, environ=environ)
            for name, (command, environ) in commands.items()}


def test_a_new_setting_documents_itself(my_command, refused):
    shown = subprocess.run([sys.executable, str(my_command), '--help'], env=env(PYTHONPATH=REPO),
                           capture_output=True, text=True)
    assert re.search(r'^  --new_knob=3 +how far to turn it, in clicks$', shown.stdout, re.M)
    typo = refused['my_command'].result()
    assert one_error(typo) == "error: unknown key 'new_knb': did you mean new_knob? (--help lists them all)"


@pytest.mark.parametrize('script, typo, meant', TYPOS)
def test_a_typo_names_the_key_meant(script, typo, meant, refused):
    line = one_error(refused[script].result())
    assert f'did you mean {meant}?' in line


def test_prepare_help():
    """(Its mistyped option: test_bad_inputs.py's prepare_typo.)"""
    shown = helped('data/prepare.py', '--help')
    for option in ('--name', '--tokenizer', '--val_fraction', '--seed', '--num_proc', '--text_field',
                   '--force'):
        assert option in shown
    assert '(default: 0.1)' in shown  # --val_fraction's


def test_a_flag_without_its_value_says_how_to_write_it(refused):
    line = one_error(refused['flag_without_value'].result())
    assert "'--dry_run': overrides are written --dry_run=True" in line
    assert 'did you mean --cpu-demo?' in one_error(sh('--cpu_demo'))  # the launcher script's own option


def test_launcher_script_help_without_a_gpu():
    proc = sh('--help')
    assert proc.returncode == 0 and 'error' not in proc.stdout
    for option in ('--cpu-demo', '--dry-run', '--num_gpus N', '--hostfile FILE', '--node_rank N',
                   '--master_addr ADDR', '--master_port PORT', 'python train_deepspeed.py --help'):
        assert option in proc.stdout
    assert 'No GPU visible' not in proc.stdout  # the usage, not the no-GPU path


def readme_commands():
    """The commands in the first column of README.md's Commands table, as written there."""
    readme = open(os.path.join(REPO, 'README.md')).read()
    table = readme.split('\n## Commands\n', 1)[1].split('\n## ', 1)[0]
    rows = [line.split(' | ')[0] for line in table.splitlines() if line.startswith('| `')]
    return [command for row in rows for command in re.findall(r'`([^`]+)`', row)]


def asking_help(command):
    """The command line that asks a README command for its help: its script and --help. A Python script runs
    under this python; the deepspeed launcher's row through plain python too (the same script, a world of
    one: a launch would only start ranks that print the same help)."""
    script = next((word for word in command.split() if word.endswith(('.py', '.sh'))), None)
    assert script and os.path.isfile(os.path.join(REPO, script)), f'{command!r} names no script here'
    if script.endswith('.py'):
        return sys.executable, script, '--help'
    return os.path.join(REPO, script), '--help'


@pytest.mark.parametrize('command', readme_commands())
def test_every_readme_command_answers_help(command):
    """Each command of the README's table (the Shakespeare scripts, tests/gpu_smoke.sh, run_deepspeed_xl.sh
    and setup.sh among them) answers --help: exit 0, its own usage on stdout, nothing on stderr, and neither
    an error line nor the launcher script's `running:` line (what it prints before it launches)."""
    args = asking_help(command)
    if args[0] == sys.executable:
        shown = helped(*args[1:])
    else:
        proc = subprocess.run(args, cwd=REPO, env=env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr == '', proc.stderr
        shown = proc.stdout
    assert os.path.basename(args[-2]) in shown, shown  # its own usage, not another command's
    assert not re.search(r'^(error|running):', shown, re.M), shown
