"""setup.sh: the install the README's two commands start with."""
import os
import re
import subprocess
import sys

from conftest import REPO


def test_setup_names_no_package_index_host():
    """pip's own configuration says where packages come from; setup.sh adds no address."""
    text = open(os.path.join(REPO, 'setup.sh')).read()
    assert not re.search(r'[a-z]+://', text)


def test_no_gpu_install_has_no_cuda_packages():
    listed = subprocess.run([sys.executable, '-m', 'pip', 'list', '--format=freeze'],
                            capture_output=True, text=True, check=True).stdout
    if subprocess.run('nvidia-smi -L', shell=True, capture_output=True).returncode == 0:
        return  # a GPU machine takes the CUDA build on purpose
    assert not [line for line in listed.splitlines() if line.lower().startswith('nvidia') or '+cu' in line]
