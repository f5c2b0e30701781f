"""gradient_checkpointing=True recomputes each block in the backward pass instead of keeping its activations:
on real 2-rank DeepSpeed runs (fp32, dropout 0.1, gradient accumulation) it trains to the same losses as the
run without it, and its checkpoints resume either way. (Under ZeRO-3, whose parameters are gathered again in
the recomputation, the saved_run_zero3 fixture trains with it: test_deepspeed_runs.)"""
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TINY, launch, metrics, ok

ARGS = [*TINY, '--dropout=0.1', '--gradient_accumulation_steps=2', '--max_iters=10', '--eval_interval=5',
        '--lr_decay_iters=10']


def losses(out_dir):
    """iter -> the logged training loss, the last record of an iter winning (a resumed run logs again)."""
    return {r['iter']: r['loss'] for r in metrics(out_dir) if 'loss' in r}


def evals(out_dir):
    return {r['iter']: r['val_loss'] for r in metrics(out_dir) if 'val_loss' in r}


@pytest.mark.launches
def test_same_losses_with_and_without_recomputation(tmp_path):
    """The run without recomputation (under ZeRO-2) and the run with it, side by side (a launch keeps both
    cores busy only while its ranks run); then the recomputed run's iter_5 resumed without recomputation."""
    config = '--deepspeed_config=ds_config_zero2.json'
    plain, recomputed = tmp_path / 'plain', tmp_path / 'recomputed'
    with ThreadPoolExecutor(max_workers=1) as beside:
        plain_run = beside.submit(launch, [*ARGS, f'--out_dir={plain}'])
        proc = ok(launch([*ARGS, config, f'--out_dir={recomputed}', '--gradient_checkpointing=True',
                          '--always_save_checkpoint=True']))
        ok(plain_run.result())
    assert "gradient checkpointing's recomputation is not counted" in proc.stdout  # the model recomputes
    assert sorted(losses(plain)) == list(range(10))
    for it, loss in losses(plain).items():
        assert abs(losses(recomputed)[it] - loss) <= 1e-6, (it, losses(recomputed)[it], loss)
    for it, loss in evals(plain).items():
        assert abs(evals(recomputed)[it] - loss) <= 1e-6, (it, evals(recomputed)[it], loss)

    # its checkpoint resumes without recomputation, exactly where the uninterrupted run went
    ok(launch([*ARGS, config, f'--out_dir={recomputed}', '--init_from=resume', '--resume_tag=iter_5']))
    for it in range(5, 10):
        assert abs(losses(recomputed)[it] - losses(plain)[it]) <= 1e-6, it
