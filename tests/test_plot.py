"""plot.py on a synthetic metrics.jsonl: a run killed at iter 9 and resumed from its iter-5 checkpoint, which
appends iters 5.. again to the same file. No launcher, no training. The error cases' commands, each loading
torch to say its line, run two at a time (the refused fixture)."""
import json
import os
import sys

import pytest
from conftest import ok, run, selected
from PIL import Image

from nanogpt_ds.loss_plot import plot_run, read_metrics


def train(it, loss, **extra):
    return {'iter': it, 'loss': loss, 'lr': 1e-3, 'dt_ms': 100.0, 'tokens_per_s': 20000.0 + it, **extra}


def write_run(folder):
    first = [train(i, 3.0 - 0.1 * i) for i in range(10)] + [{'iter': 0, 'train_loss': 3.1, 'val_loss': 3.2},
                                                           {'iter': 5, 'train_loss': 2.6, 'val_loss': 2.7}]
    first.sort(key=lambda r: r['iter'])
    resumed = [{'iter': 5, 'train_loss': 2.5, 'val_loss': 2.55}] + \
              [train(i, 2.0 - 0.05 * i, mfu=0.31, max_mem_gb=1.5) for i in range(5, 13)] + \
              [{'iter': 10, 'train_loss': 1.6, 'val_loss': 1.7}]
    killed_write = '{"iter": 9, "lo'
    lines = [json.dumps(r) for r in first] + [killed_write] + [json.dumps(r) for r in resumed]
    (folder / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')


def test_read_metrics_later_line_wins(tmp_path):
    write_run(tmp_path)
    train_records, eval_records = read_metrics(str(tmp_path))
    assert [r['iter'] for r in train_records] == list(range(13))
    assert [r['iter'] for r in eval_records] == [0, 5, 10]
    by_iter = {r['iter']: r for r in train_records}
    assert by_iter[4]['loss'] == pytest.approx(2.6)  # only the first run logged it
    assert by_iter[7]['loss'] == pytest.approx(2.0 - 0.35)  # the resumed run's, not the first run's 2.3
    assert by_iter[12]['mfu'] == 0.31  # unknown keys pass through untouched
    assert eval_records[1] == {'iter': 5, 'train_loss': 2.5, 'val_loss': 2.55}


def png_ok(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == 'PNG' and im.size[0] > 400 and im.size[1] > 300


def test_cli_writes_loss_png_and_nothing_else(tmp_path):
    write_run(tmp_path)
    proc = ok(run([sys.executable, 'plot.py', str(tmp_path)]))
    assert 'loss.png' in proc.stdout
    png_ok(tmp_path / 'loss.png')
    assert sorted(os.listdir(tmp_path)) == ['loss.png', 'metrics.jsonl']
    os.remove(tmp_path / 'loss.png')
    ok(run([sys.executable, 'plot.py', f'--out_dir={tmp_path}']))  # the configurator's spelling
    png_ok(tmp_path / 'loss.png')


def test_plot_run_in_process_and_failed_plot_keeps_old_png(tmp_path, monkeypatch):
    write_run(tmp_path)
    assert plot_run(str(tmp_path)) == os.path.join(str(tmp_path), 'loss.png')
    png_ok(tmp_path / 'loss.png')
    before = (tmp_path / 'loss.png').read_bytes()
    from matplotlib.figure import Figure

    def broken_savefig(self, f, **kwargs):
        f.write(b'\x89PNG half')
        raise RuntimeError('disk full')
    monkeypatch.setattr(Figure, 'savefig', broken_savefig)
    with pytest.raises(RuntimeError, match='disk full'):
        plot_run(str(tmp_path))
    assert (tmp_path / 'loss.png').read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['loss.png', 'metrics.jsonl']  # no temporary file left behind


def test_only_evals_or_only_training_records(tmp_path):
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(json.dumps({'iter': 0, 'train_loss': 3.0, 'val_loss': 3.1}) + '\n')
    png_ok(plot_run(str(tmp_path)))
    metrics.write_text(json.dumps({'iter': 0, 'loss': 3.0}) + '\n')  # no tokens_per_s either
    png_ok(plot_run(str(tmp_path)))


def test_helpers_raise_value_error(tmp_path):
    """In process (the trainer's --plot=True), a problem is a ValueError the caller reports, not an exit."""
    with pytest.raises(ValueError, match='not found: pass the folder the run saved into'):
        read_metrics(str(tmp_path / 'nope'))
    with pytest.raises(ValueError, match='no metrics.jsonl in'):
        plot_run(str(tmp_path))


def unplottable(case, tmp_path):
    """The out_dir of a case: missing, without metrics.jsonl, or with one that holds no usable record."""
    out_dir = tmp_path / 'nope' if case == 'missing_dir' else tmp_path
    if case == 'no_records':
        unusable = '\n{"iter": 3, "lo\n[1, 2]\n{"loss": 2.0}\n{"iter": 1, "note": "x"}\n'
        (tmp_path / 'metrics.jsonl').write_text(unusable)
    return out_dir


@pytest.fixture(scope='module')
def refused(two_at_a_time, tmp_path_factory, request):
    """case -> (its folder, its out_dir, Future of `python plot.py OUT_DIR`'s CompletedProcess) for each case
    below that this session runs, every command started at once."""
    started = {}
    for _, case in selected(request, ['test_errors_are_one_line']):
        tmp_path = tmp_path_factory.mktemp(case)
        out_dir = unplottable(case, tmp_path)
        plot = two_at_a_time.submit(run, [sys.executable, 'plot.py', str(out_dir)])
        started[case] = tmp_path, out_dir, plot
    return started


@pytest.mark.parametrize('case', ['missing_dir', 'no_metrics', 'no_records'])
def test_errors_are_one_line(case, refused):
    tmp_path, out_dir, future = refused[case]
    proc = future.result()
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith('error: '), proc.stdout
    if case == 'no_metrics':
        assert lines[0] == (f'error: no metrics.jsonl in {out_dir}: '
                            f'run train_deepspeed.py with --out_dir={out_dir} first')
    assert not (tmp_path / 'loss.png').exists()
