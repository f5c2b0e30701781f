"""dtype='auto' follows what the device computes natively; bf16 that a CPU only emulates runs, after one
warning with the measured slowdown. Both kinds of CPU are real here: AVX2_ONLY caps oneDNN and ATen at AVX2,
so a CPU with bf16 kernels answers and computes as one without (an AVX2 AMD EPYC, say)."""
import os
import re
import sys

import pytest
import torch
from conftest import AVX2_ONLY, TINY, dry_run, env, ok, run

from nanogpt_ds.ds_setup import choose_dtype, cpu_bf16_native


@pytest.mark.parametrize('on_gpu,gpu_major,bf16_native,planning_gpus,bf16_speedup,expected', [
    (True, 8, False, False, 0.0, 'bfloat16'),  # A100, H100
    (True, 7, False, False, 0.0, 'float16'),  # V100
    (False, 0, True, False, 2.0, 'bfloat16'),  # bf16 kernels that pay (AMX, say)
    (False, 0, True, False, 0.9, 'float32'),  # bf16 kernels no faster than fp32's (AVX512-BF16, a Xeon here)
    (False, 0, True, False, 0.0, 'float32'),  # not yet timed
    (False, 0, False, False, 2.0, 'float32'),  # an AVX2 CPU: bf16 emulated, ~60x slower
    (False, 0, False, True, 0.0, 'bfloat16'),  # a dry run planning GPUs from a laptop
])
def test_auto_dtype_by_device(on_gpu, gpu_major, bf16_native, planning_gpus, bf16_speedup, expected):
    dtype, why = choose_dtype('auto', on_gpu, gpu_major, bf16_native, planning_gpus, bf16_speedup)
    assert dtype == expected and why
    explicit = choose_dtype('float32', on_gpu, gpu_major, bf16_native, planning_gpus, bf16_speedup)
    assert explicit == ('float32', '')


def auto_plan(*args, extra=None):
    """The dry run's text for TINY with dtype auto."""
    return ok(dry_run(*TINY, '--dtype=auto', *args, environ=env(**(extra or {}))))


def test_auto_says_what_it_picked_and_why():
    """What the CPU says it has decides: where ATen runs at AVX2 or less (an AVX2 EPYC; any CPU under
    AVX2_ONLY) oneDNN has no bf16 kernels and auto keeps fp32, naming the capability; with kernels, bf16 where
    a block of the model, timed forward and backward, is clearly faster in bf16 than fp32, as the line says.
    No speed is asserted: emulated bf16 ran at 1/60 of fp32's speed on one AVX2 EPYC, 1/5 on a Zen 4 capped
    at AVX2."""
    capability = torch.backends.cpu.get_cpu_capability()
    said = re.search(r"dtype auto -> (\w+): (.*)", auto_plan().stdout)
    if capability in ('AVX2', 'DEFAULT', 'NO AVX'):
        assert not cpu_bf16_native()
        assert said.group(0) == f'dtype auto -> float32: this CPU ({capability}) has no bf16 kernels: bf16 ' \
                                'would be emulated, 10-60x slower'
    elif not cpu_bf16_native():
        assert said.group(1) == 'float32' and 'no bf16 kernels' in said.group(2)
    else:
        measured = re.search(r'a block of this model runs ([\d.]+)x as fast in bf16', said.group(2))
        speedup = float(measured.group(1))
        assert said.group(1) == ('bfloat16' if speedup >= 1.5 else 'float32')
    avx2 = auto_plan(extra=AVX2_ONLY).stdout
    assert 'dtype auto -> float32: this CPU (AVX2) has no bf16 kernels' in avx2
    gpus = auto_plan('--plan_gpus=4').stdout
    assert 'dtype auto -> bfloat16: planning GPUs' in gpus


def test_emulated_bf16_runs_after_one_warning_and_keeps_mfu_honest(tmp_path):
    """An explicit bf16 on a CPU that emulates it: one warning with the measured slowdown, then the run. Its
    MFU is a share of what bf16 reaches here, never above 100% (a fixed 512x512 matmul's peak gave 285%)."""
    out = tmp_path / 'out'
    proc = ok(run([sys.executable, 'train_deepspeed.py', *TINY, '--dtype=bfloat16', f'--out_dir={out}',
                   '--max_iters=3', '--eval_interval=3'], environ=env(**AVX2_ONLY)))
    warnings = [line for line in proc.stdout.splitlines() if line.startswith('warning: dtype=bfloat16')]
    assert len(warnings) == 1, proc.stdout[-3000:]
    assert re.search(r'runs \d+x slower than fp32 here', warnings[0])  # 11x on a Xeon, 60x on an EPYC
    assert '--dtype=auto picks float32' in warnings[0]
    assert 'ZeRO-2, bfloat16, 1 rank(s)' in proc.stdout
    shares = [float(m) for m in re.findall(r'MFU ([\d.]+)%', proc.stdout)]
    assert all(share <= 100 for share in shares), proc.stdout[-3000:]
    assert os.path.isdir(out / 'final')
