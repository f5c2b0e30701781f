"""Helpers for tests that launch the real deepspeed launcher with CPU ranks over gloo."""
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: python, deepspeed
# a small model that trains in seconds on the real character-level Shakespeare data
TINY = ['--init_from=scratch', '--dataset=shakespeare_char', '--n_layer=2', '--n_head=2', '--n_embd=64',
        '--block_size=32', '--batch_size=8', '--gradient_accumulation_steps=1', '--dtype=float32',
        '--eval_iters=4', '--log_interval=1', '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def env():
    e = dict(os.environ, DS_ACCELERATOR='cpu', PYTHONUNBUFFERED='1', PATH=BIN + os.pathsep + os.environ['PATH'])
    for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CUDA_VISIBLE_DEVICES'):
        e.pop(k, None)
    return e


def launch(args, ranks=2, timeout=300):
    """deepspeed --num_gpus <ranks> train_deepspeed.py <args>; returns the CompletedProcess (output merged)."""
    cmd = [os.path.join(BIN, 'deepspeed'), '--num_gpus', str(ranks), '--master_port', str(free_port()),
           'train_deepspeed.py', *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='session', autouse=True)
def prepared_data():
    for name in ('shakespeare_char', 'shakespeare'):
        if not os.path.exists(os.path.join(REPO, 'data', name, 'val.bin')):
            ok(run([sys.executable, f'data/{name}/prepare.py']))
