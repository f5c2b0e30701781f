"""run_deepspeed_xl.sh: its checks each fail with one clear line, and the CPU demo runs through it."""
import json
import os
import shutil
import subprocess
import sys

from conftest import REPO, env

SCRIPT = os.path.join(REPO, 'run_deepspeed_xl.sh')


def sh(*args, environ=None, script=SCRIPT, timeout=300):
    return subprocess.run([script, *args], cwd=REPO, env=environ or env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    return lines[0]


def test_no_gpu_offers_the_cpu_demo():
    proc = sh()
    assert proc.returncode == 1
    assert 'No GPU visible' in proc.stdout and './run_deepspeed_xl.sh --cpu-demo' in proc.stdout


def test_dry_run_plans_without_a_gpu(tmp_path):
    proc = sh('--dry-run', '--num_gpus', '8', '--plan_gpu_mem_gb=24', '--dtype=bfloat16', '--batch_size=2',
              '--gradient_accumulation_steps=8', f'--out_dir={tmp_path / "out"}')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '8 GPU(s), planned' in proc.stdout and '2 (micro) x 8 (accumulation) x 8 (world) = 128 sequences' in proc.stdout
    assert 'recommended for 24.0 GiB per GPU and 128 sequences per step' in proc.stdout
    assert not (tmp_path / 'out').exists()


def test_cuda_visible_devices_naming_missing_gpus():
    proc = sh(environ=dict(env(), CUDA_VISIBLE_DEVICES='0,1'))
    assert 'CUDA_VISIBLE_DEVICES names GPU 0 but this machine has no GPU' in error_line(proc)


def test_bad_inputs_stop_before_launch(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"zero_optimization": {"stage": 2,}')
    line = error_line(sh('--cpu-demo', f'--deepspeed_config={bad}'))
    assert f'DeepSpeed config {bad} is missing or not valid JSON' in line
    line = error_line(sh('--cpu-demo', f'--dataset={tmp_path}/nodata'))
    assert f'{tmp_path}/nodata/train.bin not found: run python {tmp_path}/nodata/prepare.py' in line
    proc = sh('--cpu-demo', '--max_iter=3')
    assert proc.returncode == 2 and "unknown key 'max_iter'" in proc.stderr


def test_deepspeed_missing(tmp_path):
    """A copy of the script with no .venv beside it, and on PATH a fresh virtualenv without deepspeed."""
    shutil.copy(SCRIPT, tmp_path)
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(tmp_path / 'bare')], check=True)
    environ = dict(env(), PATH=f"{tmp_path / 'bare' / 'bin'}:/usr/bin:/bin")
    line = error_line(sh(environ=environ, script=str(tmp_path / 'run_deepspeed_xl.sh')))
    assert 'deepspeed is not importable' in line and './setup.sh' in line


def test_the_cpu_demo(cpu_demo):
    """The README's demo, whole, through the launcher script: it must learn Shakespeare (val loss <= 1.8;
    a unigram model gets about 3.3) and print a sample."""
    proc, out = cpu_demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'GPUs:        2 CPU ranks (gloo)' in proc.stdout
    assert 'train_batch_size = 32 (micro batch) x 1 (accumulation) x 2 (world size)' in proc.stdout
    assert 'ZeRO-2, float32, 2 rank(s) on cpu (gloo)' in proc.stdout or 'ZeRO-2, bfloat16' in proc.stdout
    assert 'dtype auto -> ' in proc.stdout
    assert f'checkpoints: {out} (final is the newest' in proc.stdout
    final = [json.loads(line) for line in open(out / 'metrics.jsonl') if 'val_loss' in line][-1]
    assert final['iter'] == 700 and final['val_loss'] <= 1.8
    sample = proc.stdout.split('-' * 40)[1]
    assert len(sample) > 200 and sample.count(' ') > 20  # words, not one long token soup
