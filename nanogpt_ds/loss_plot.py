"""
The loss plot of a run: out_dir/loss.png drawn from its metrics.jsonl (train loss per logged iter and eval
train/val loss on top, tokens/s below), for plot.py and the trainer's --plot=True.
"""
import json
import os
import sys


def read_metrics(out_dir):
    """(train_records, eval_records), each sorted by iter. A resumed run appends to the same file, so an iter
    can appear twice: the later line wins. Unknown keys are ignored; lines that do not parse are skipped."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    if not os.path.isdir(out_dir):
        raise ValueError(f'{out_dir} not found: pass the folder the run saved into (its --out_dir)')
    if not os.path.isfile(path):
        raise ValueError(f'no metrics.jsonl in {out_dir}: '
                         f'run train_deepspeed.py with --out_dir={out_dir} first')
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # e.g. the half-written last line of a killed run
            if isinstance(r, dict) and isinstance(r.get('iter'), int):
                if isinstance(r.get('loss'), (int, float)):
                    train[r['iter']] = r
                elif isinstance(r.get('val_loss'), (int, float)):
                    evals[r['iter']] = r
    if not train and not evals:
        raise ValueError(f'{path} holds no training or eval records: '
                         'let the run reach its first log_interval')
    return [train[i] for i in sorted(train)], [evals[i] for i in sorted(evals)]


def plot_run(out_dir):
    """Draw out_dir/loss.png from out_dir/metrics.jsonl and return its path; a user error raises ValueError
    with the fix in its message."""
    train, evals = read_metrics(out_dir)
    try:  # imported here: the trainer needs matplotlib only with --plot=True
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError('plotting needs matplotlib: pip install matplotlib') from None
    # a bare Agg figure: no display, no pyplot global state
    fig = Figure(figsize=(8, 6), layout='constrained')
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    nan = float('nan')  # a record without the key leaves a gap instead of failing the plot
    train_iters, eval_iters = [r['iter'] for r in train], [r['iter'] for r in evals]
    top.plot(train_iters, [r['loss'] for r in train], lw=0.7, alpha=0.6, label='train (logged iters)')
    for key, marker in (('train_loss', 'o'), ('val_loss', 's')):
        top.plot(eval_iters, [r.get(key, nan) for r in evals], marker=marker, ms=4, label=f'eval {key}')
    top.set(ylabel='loss', title=os.path.basename(os.path.abspath(out_dir))), top.legend()
    bottom.plot(train_iters, [r.get('tokens_per_s', nan) for r in train], lw=0.7)
    bottom.set(xlabel='iter', ylabel='tokens/s'), top.grid(alpha=0.3), bottom.grid(alpha=0.3)
    # a new file beside loss.png ('x': never one that exists), renamed over it:
    # a failed plot leaves no half png
    tmp = os.path.join(out_dir, f'.loss.png.{os.getpid()}.partial')
    path = os.path.join(out_dir, 'loss.png')
    f = open(tmp, 'xb')  # outside the try: a tmp that exists is not ours to remove
    try:
        with f:
            fig.savefig(f, format='png', dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
    return path


def plot_after_run(out_dir):
    """The trainer's --plot=True at the end of a run: the plot, or a warning (no reason to fail the run)."""
    try:
        print(f'plotted {plot_run(out_dir)}')
    except ValueError as e:
        print(f'warning: no plot: {e}', file=sys.stderr)
