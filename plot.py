"""
Plot a run's metrics.jsonl: train loss per logged iter and eval train/val loss on top, tokens/s below.
$ python plot.py out-shakespeare-char-cpu         # or: python plot.py --out_dir=out-shakespeare-char-cpu
writes out_dir/loss.png and nothing else; it only reads metrics.jsonl, so it is safe while the run goes on.
"""
import sys

from configurator import answer_help

answer_help(__file__)  # before OUT_DIR is taken from the arguments: -h is not a folder
# -----------------------------------------------------------------------------
out_dir = 'out-shakespeare-xl-deepspeed'  # the run's out_dir: the folder holding metrics.jsonl
# -----------------------------------------------------------------------------
from configurator import configure

args = sys.argv[1:]
if args and not args[0].startswith('--'):  # `plot.py OUT_DIR`: a folder, not a config file
    out_dir = args.pop(0)
configure(globals(), args)
from nanogpt_ds.loss_plot import plot_run
from nanogpt_ds.settings import check_values, die

try:
    check_values(globals(), named=('out_dir',))
    path = plot_run(out_dir)
except ValueError as e:
    die(str(e))
print(f'wrote {path}')
