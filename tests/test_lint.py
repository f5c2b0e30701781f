"""ruff over the whole repository, with ruff.toml's rules. A test, because the README's test command (what
.ci/run runs) is the one command that runs: a finding fails it like a broken test would."""
import os
import subprocess

from conftest import BIN, REPO


def test_ruff_finds_nothing():
    cmd = [os.path.join(BIN, 'ruff'), 'check', '--no-cache', '--output-format=concise', '.']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
