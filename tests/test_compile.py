"""compile=True: torch.compile through DeepSpeed's engine (model_engine.compile(), which compiles the module
in place). A compiled run trains the eager run's model, in fp32 to 1e-5, under ZeRO-2 (compile='auto' on GPUs)
with gradient checkpointing; its checkpoints are the eager run's (the same parameter names), so either resumes
the other and export reads them. Real 2-rank DeepSpeed runs on CPU, compared with the saved_run fixture's
eager ZeRO-2 run. (Compiled under ZeRO-3, which 'auto' leaves eager, the losses matched too when measured;
that costs a compilation more than the suite can spend.)"""
import shutil

import pytest
from conftest import SAVED_RUN, launch, metrics, ok

from nanogpt_ds import consolidate
from nanogpt_ds.ds_setup import resolve_compile


def assert_eager_losses(records, eager_dir, resumed_at=0):
    """records hold the eager run's training and val losses from resumed_at to the end, and no others (a
    resumed run does not repeat the eval its checkpoint was saved after)."""
    eager = metrics(eager_dir)
    for key, first in (('loss', resumed_at), ('val_loss', resumed_at + 1 if resumed_at else 0)):
        want = {r['iter']: r[key] for r in eager if key in r and r['iter'] >= first}
        got = {r['iter']: r[key] for r in records if key in r}
        assert sorted(got) == sorted(want), key
        assert got == pytest.approx(want, abs=1e-5), key


def test_auto_compiles_where_it_pays():
    """'auto': on GPUs under ZeRO 0-2; not under ZeRO-3 (a graph break at every module's gather), not on CPU
    (docs/performance.md). True and False are kept."""
    assert [resolve_compile('auto', True, stage)[0] for stage in (0, 1, 2, 3)] == [True, True, True, False]
    assert [resolve_compile('auto', False, stage)[0] for stage in (0, 2, 3)] == [False, False, False]
    assert resolve_compile(True, False, 3) == (True, resolve_compile(True, True, 2)[1])
    assert resolve_compile(False, True, 2) == (False, '')


def test_eager_and_compiled_checkpoints_resume_each_other(saved_run, tmp_path):
    """saved_run's eager iter_6 resumed compiled, with gradient checkpointing; then its iter_8 resumed
    eager."""
    eager, _ = saved_run
    out = tmp_path / 'out'
    shutil.copytree(eager, out)
    proc = ok(launch([*SAVED_RUN, f'--out_dir={out}', '--init_from=resume', '--resume_tag=iter_6',
                      '--compile=True', '--gradient_checkpointing=True']))
    assert 'ZeRO-2, float32' in proc.stdout and 'compile: on' in proc.stdout
    compiled = metrics(out)[len(metrics(eager)):]
    assert_eager_losses(compiled, eager, resumed_at=6)
    model, client = consolidate.load_model(str(out), 'final')  # what export.py reads: the eager names
    assert client['config']['compile'] is True and model.get_num_params() > 0

    proc = ok(launch([*SAVED_RUN, f'--out_dir={out}', '--init_from=resume', '--resume_tag=iter_8',
                      '--compile=False']))
    assert 'resumed at iter 8' in proc.stdout and 'compile: on' not in proc.stdout
    assert_eager_losses(metrics(out)[len(metrics(eager)) + len(compiled):], eager, resumed_at=8)
