"""
Values of train_deepspeed.py's settings that cannot work, found before anything starts. The configurator
already checks each value's type; this checks what a value of the right type can still get wrong.
"""
import math

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


def check(config):
    """ValueError naming the first setting that cannot work, and its fix."""
    found = problem(config)
    if found:
        raise ValueError(found)


def problem(config):
    """The first setting that cannot work, as one line that names the fix; '' when all can."""
    for key, least in AT_LEAST.items():
        value = config[key]
        if not math.isfinite(value) or value < least:
            return f'{key}={value} cannot work: use --{key}={least} or more'
    for key in BELOW_ONE:
        if not 0 <= config[key] < 1:
            return f'{key}={config[key]} cannot work: use a value from 0 up to (not including) 1'
    learning_rate = config['learning_rate']
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        return f'learning_rate={learning_rate} cannot work: use a positive --learning_rate, like 1e-3'
    n_embd, n_head = config['n_embd'], config['n_head']
    if config['init_from'] == 'scratch' and n_embd % n_head:
        nearest = max(n_head, n_embd // n_head * n_head)
        return (f'n_embd={n_embd} does not split into n_head={n_head} heads: '
                f'use a multiple, like --n_embd={nearest}')
    if config['compile'] not in (True, False, 'auto'):
        return f"compile={config['compile']!r} cannot work: use --compile=True, False or auto"
    if not config['out_dir']:
        return "out_dir='' would write checkpoints into the current folder: name one, like --out_dir=out"
    return ''
