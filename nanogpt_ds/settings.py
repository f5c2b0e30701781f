"""
Values of train_deepspeed.py's settings that cannot work, or would do nothing where they are given, found
before anything starts; check_values does the same for the other commands' numbers and names. The
configurator already checks each value's type; this checks what a value of the right type can still get wrong.
And the one way every command stops on a user error, die() (user_errors() around the helpers that raise
ValueError): here, because this module loads no torch, so an error line costs a Python start, not torch's.
"""
import contextlib
import math
import os
import signal
import sys
import time

# setting -> the least value that works (ints: counts of iterations, batches, layers ...)
AT_LEAST = {
    'max_iters': 1, 'eval_interval': 1, 'log_interval': 1, 'eval_iters': 1, 'batch_size': 1,
    'gradient_accumulation_steps': 1, 'block_size': 1, 'n_layer': 1, 'n_head': 1, 'n_embd': 1,
    'warmup_iters': 0, 'lr_decay_iters': 0, 'keep_last_n': 1, 'max_nonfinite': 1, 'early_stop_patience': 0,
    'seed': 0, 'sample_max_new_tokens': 0, 'plan_gpus': 0, 'min_free_disk_mb': 0, 'dist_timeout_s': 0.0,
    'weight_decay': 0.0, 'grad_clip': 0.0, 'min_lr': 0.0, 'peak_flops': 0.0, 'plan_gpu_mem_gb': 0.0,
    'gpu_mem_cap_gb': 0.0,
}
BELOW_ONE = ('dropout', 'beta1', 'beta2')  # fractions in [0, 1)
DTYPES = ('float32', 'bfloat16', 'float16')  # what the commands compute in (the trainer also takes 'auto')
# how long a rank other than 0 that found a problem every rank finds waits for rank 0 to say it
RANK0_SAYS_IT_S = 20
NAMED = ('dataset',)  # text that must name something (init_from, dtype...: refused later, with the choices)
# setting -> (the setting it is read with, the value that reads it): given without that, it would do nothing
READ_ONLY_WITH = {'resume_tag': ('init_from', 'resume'), 'plan_gpus': ('dry_run', True),
                  'plan_gpu_mem_gb': ('dry_run', True)}


def check(config):
    """ValueError naming the first setting that cannot work, and its fix."""
    found = problem(config)
    if found:
        raise ValueError(found)


def check_values(config, at_least=None, positive=None, below_one=(), named=(), choices=None):
    """Every command's numbers and names: ValueError naming the first that cannot work, and its fix.
    at_least {setting: least}; positive {setting: an example}; below_one: fractions in [0, 1); named: text
    that must not be empty; choices {setting: the values it takes}."""
    for key, least in (at_least or {}).items():
        value = config[key]
        if not math.isfinite(value) or value < least:
            raise ValueError(f'{key}={value} cannot work: use --{key}={least} or more')
    for key, example in (positive or {}).items():
        value = config[key]
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f'{key}={value} cannot work: use a positive --{key}, like {example}')
    for key in below_one:
        if not 0 <= config[key] < 1:
            raise ValueError(f'{key}={config[key]} cannot work: use a value from 0 up to (not including) 1')
    for key in named:
        if isinstance(config[key], str) and not config[key].strip():  # (dataset may be a mix, a dict)
            raise ValueError(f'{key}={config[key]!r} names nothing: give one (--help shows the default)')
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            raise ValueError(f"{key}={config[key]!r} cannot work: use {', '.join(map(repr, allowed))}")


def heads_problem(n_embd, n_head):
    """'' when n_embd splits into n_head heads, else the line naming the nearest width that does."""
    if n_embd % n_head == 0:
        return ''
    nearest = max(n_head, n_embd // n_head * n_head)
    return (f'n_embd={n_embd} does not split into n_head={n_head} heads: use a multiple, like '
            f'--n_embd={nearest}')


def problem(config):
    """The first setting that cannot work, as one line that names the fix; '' when all can."""
    try:
        check_values(config, AT_LEAST, {'learning_rate': 1e-3}, BELOW_ONE, NAMED)
    except ValueError as e:
        return str(e)
    if config['wandb_log'] and not config['wandb_project'].strip():
        return "wandb_project='' with wandb_log=True: name the project, like --wandb_project=my-runs"
    learning_rate, floor = config['learning_rate'], config['min_lr']
    if config['decay_lr'] and floor > learning_rate:  # e.g. a config file's min_lr, a lower --learning_rate
        return (f'min_lr={floor:g} is above learning_rate={learning_rate:g}: the cosine would climb; use a '
                f'lower --min_lr, like {learning_rate / 10:g}')
    heads = heads_problem(config['n_embd'], config['n_head'])
    if config['init_from'] == 'scratch' and heads:  # a pretrained or resumed model keeps its own shape
        return heads
    if config['compile'] not in (True, False, 'auto'):
        return f"compile={config['compile']!r} cannot work: use --compile=True, False or auto"
    if not config['out_dir']:
        return "out_dir='' would write checkpoints into the current folder: name one, like --out_dir=out"
    for key, (other, reads_it) in READ_ONLY_WITH.items():
        if config[key] and config[other] != reads_it:  # each is off (empty, 0) by default
            return (f'{key}={config[key]!r} is read only with {other}={reads_it!r}: '
                    f'add --{other}={reads_it}, or leave {key} out')
    return ''


def die(msg, alone=False, exit_code=1):
    """Stop with one 'error:' line and exit 1 (or exit_code), writing nothing more. Every rank checks the
    same inputs: rank 0 says it at once, and another rank waits for the launcher to stop it once rank 0 has
    exited (were it to exit first, the launcher could kill rank 0 before its line came out). A rank that
    alone knows the problem (alone=True), or whose rank 0 never comes, says it itself."""
    rank = int(os.environ.get('RANK', '0'))
    if rank != 0 and not alone:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # the launcher's stop ends the wait, not a save
        time.sleep(RANK0_SAYS_IT_S)
    print(f'error: {msg}', file=sys.stderr, flush=True)
    os._exit(exit_code)


@contextlib.contextmanager
def user_errors(alone=False):
    """Inside, a ValueError -- what the helpers raise for bad input, the fix in its message -- stops the
    process through die(): the one way a command stops on a user error."""
    try:
        yield
    except ValueError as e:
        die(str(e), alone=alone)
