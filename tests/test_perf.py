"""perf.py's pure parts: the peak table's matching, the phase timer's bookkeeping, the log line."""
import pytest

from nanogpt_ds import perf
from nanogpt_ds.perf import PhaseTimer, gpu_peak_flops, log_line


@pytest.mark.parametrize('name,dtype,tflops', [
    ('Tesla V100-SXM2-32GB', 'float16', 125), ('Tesla V100-PCIE-32GB', 'bfloat16', None),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312), ('NVIDIA A100-PCIE-40GB', 'float32', 156),
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989), ('NVIDIA H100 PCIe', 'bfloat16', 756),
    ('NVIDIA H200', 'float16', 989),
    ('NVIDIA A10', 'bfloat16', 125), ('NVIDIA A10G', 'bfloat16', None), ('NVIDIA L4', 'float16', 121),
    ('NVIDIA L40S', 'bfloat16', None), ('NVIDIA GeForce RTX 4090', 'bfloat16', 165),
    ('NVIDIA GeForce RTX 3090', 'float16', 71), ('Some Future GPU', 'bfloat16', None)])
def test_peak_table_matches_whole_names(name, dtype, tflops):
    """A10 must not claim an A100 or an A10G, H100 PCIe must not take the SXM figure; unknown means None."""
    assert gpu_peak_flops(name, dtype) == (tflops * 1e12 if tflops else None)


def test_phase_timer_shares_add_up_and_restart_forgets(monkeypatch):
    """On CPU the timer reads perf_counter: a clock we advance by hand gives exact shares, no sleeping."""
    now = [100.0]
    monkeypatch.setattr(perf.time, 'perf_counter', lambda: now[0])
    timer = PhaseTimer(use_events=False)
    timer.restart()
    steps = (('data', 0.05), ('forward', 0.05), ('backward', 0.1), ('data', 0.05), ('step', 0.25))
    for phase, seconds in steps:
        now[0] += seconds
        timer.mark(phase)
    assert timer.fractions() == pytest.approx({'data': 0.2, 'forward': 0.1, 'backward': 0.2, 'step': 0.5})
    now[0] += 7.0  # an eval: restart() drops it
    timer.restart()
    now[0] += 0.02
    timer.mark('step')
    assert timer.fractions() == {'step': 1.0}
    now[0] += 0.3  # and the next interval starts where the last one ended
    timer.mark('forward')
    assert timer.fractions() == {'forward': 1.0}


def test_log_line_shows_what_the_record_has():
    r = {'iter': 7, 'loss': 2.5, 'lr': 1e-3, 'dt_ms': 100.0, 'tokens_per_s': 20480.0, 'rss_mb': 2048.0}
    assert log_line(r) == 'iter 7: loss 2.5000, lr 1.000e-03, time 100.00ms, 20,480 tok/s, RSS 2.00 GB'
    r.update(mfu=0.412, gpu_alloc_mb=15360.0, gpu_reserved_mb=16384.0, loss_scale=65536.0, skipped_steps=2,
             data_frac=0.01, forward_frac=0.3, backward_frac=0.6, step_frac=0.09)
    assert log_line(r) == ('iter 7: loss 2.5000, lr 1.000e-03, time 100.00ms, 20,480 tok/s, MFU 41.2% '
                           '(data 1% forward 30% backward 60% step 9%), GPU 15.0/16.0 GB, RSS 2.00 GB, '
                           'loss scale 65536 (2 skipped)')


def test_mfu_above_100_percent_is_never_shown():
    """A share above 1 means the peak was too low, not that the run was fast: no figure, and why."""
    assert perf.mfu(40e9, 2, 100e9) == (0.2, '')
    share, why = perf.mfu(300e9, 2, 100e9)
    assert share is None and '150%' in why and '--peak_flops' in why
    assert perf.mfu(40e9, 2, 0.0) == (None, '')  # no peak known: the start line said so
