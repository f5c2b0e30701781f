"""bench.py end to end on a tiny model: the plain loop and the real trainer on DeepSpeed, a lever beside the
row it changes, one table, JSON rows."""
import json
import re
import sys

import pytest
from conftest import ok, one_error, run

from nanogpt_ds import data_sources


@pytest.mark.launches  # bench.py starts the trainer's runs itself, and builds DeepSpeed's CPU Adam
def test_bench_rows(tmp_path):
    out = tmp_path / 'bench.json'
    proc = ok(run([sys.executable, 'bench.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32',
                   '--batch_size=4', '--global_batch=8', '--iters=2', '--warmup_iters=1', '--repeats=1',
                   '--stages=2', '--worlds=1', '--levers=offload', f'--json={out}'], timeout=600))
    rows = json.load(open(out))
    assert [r['name'] for r in rows] == ['plain PyTorch, 1 process', 'DeepSpeed ZeRO-2, 1 rank',
                                         'DeepSpeed ZeRO-2, 1 rank, optimizer offload']
    keys = {'name', 'tokens_per_s', 'mfu', 'ratio_vs_plain', 'run_s', 'first_iter_s'}
    assert all(set(r) == keys for r in rows)
    assert rows[0]['run_s'] is None and all(r['run_s'] > r['first_iter_s'] > 0 for r in rows[1:])
    assert rows[0]['ratio_vs_plain'] == 1.0 and all(r['tokens_per_s'] > 0 and 0 < r['mfu'] < 1 for r in rows)
    assert abs(rows[1]['ratio_vs_plain'] - rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']) < 1e-9
    assert 'DeepSpeed ZeRO-2, 1 rank' in proc.stdout and 'x plain' in proc.stdout
    # the phase timers' own cost is measured and said (its bound is docs/performance.md's, not a test's)
    assert re.search(r'phase timers: [\d.]+ us a mark x 9 marks an iteration = [\d.]+ ms, [\d.]+% of',
                     proc.stdout)


# nanoGPT's interface as its train.py has it: settings are globals that configurator.py (read from the working
# directory) overrides from --key=value; data/<dataset>/ holds train.bin and a meta.pkl with vocab_size; one
# 'iter N: loss L, time Tms, mfu M%' line per iteration 0..max_iters. No checkout can be fetched offline, so
# this stand-in has that interface, and writes down what it was given.
STAND_IN_TRAIN = '''
import json, os, pickle, sys
import numpy as np
device = dtype = dataset = out_dir = ''
compile = bias = always_save_checkpoint = True
n_layer = n_head = n_embd = block_size = batch_size = gradient_accumulation_steps = max_iters = 0
eval_interval = eval_iters = log_interval = 0
dropout = 0.0
exec(open('configurator.py').read())
data = os.path.join('data', dataset)
vocab_size = pickle.load(open(os.path.join(data, 'meta.pkl'), 'rb'))['vocab_size']
tokens = len(np.memmap(os.path.join(data, 'train.bin'), dtype=np.uint16, mode='r'))
given = {k: v for k, v in globals().items() if isinstance(v, (int, float, str)) and not k.startswith('_')}
json.dump(given, open(os.path.join(os.path.dirname(os.path.realpath(__file__)), 'given.json'), 'w'))
for it in range(max_iters + 1):
    print(f'iter {it}: loss 4.0000, time {1000.0 if it == 0 else 10.0:.2f}ms, mfu -100.00%')
'''
STAND_IN_CONFIGURATOR = '''
import ast, sys
for arg in sys.argv[1:]:
    key, _, value = arg[2:].partition('=')
    assert key in globals(), key
    try:
        globals()[key] = ast.literal_eval(value)
    except (SyntaxError, ValueError):
        globals()[key] = value
'''


def test_a_nanogpt_row_runs_its_train_py_on_the_bench_shape(tmp_path):
    checkout = tmp_path / 'nanoGPT'
    checkout.mkdir()
    (checkout / 'train.py').write_text(STAND_IN_TRAIN)
    (checkout / 'configurator.py').write_text(STAND_IN_CONFIGURATOR)
    (checkout / 'model.py').write_text('')
    out = tmp_path / 'bench.json'
    ok(run([sys.executable, 'bench.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32',
            '--batch_size=4', '--global_batch=8', '--iters=2', '--warmup_iters=1', '--repeats=1',
            '--stages=', '--worlds=', '--levers=', f'--nanogpt={checkout}', f'--json={out}'], timeout=300))
    given = json.load(open(checkout / 'given.json'))
    assert {k: given[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size')} == dict(
        n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4)
    assert given['gradient_accumulation_steps'] == 2 and given['max_iters'] == 3  # 8 sequences; 1 + 2 iters
    assert given['compile'] is False and given['device'] == 'cpu' and given['dtype'] == 'float32'
    meta = data_sources.read_meta(data_sources.vocabulary_file(data_sources.folder('shakespeare_char')))
    assert given['vocab_size'] == meta['vocab_size'] and given['tokens'] > 10**6  # the bench's data
    plain, nano = json.load(open(out))
    assert nano['name'] == "nanoGPT's train.py, 1 process"
    assert nano['tokens_per_s'] == 8 * 32 / 0.010  # its timed lines, not iter 0's 1000 ms
    assert nano['ratio_vs_nanogpt'] == 1.0
    assert abs(plain['ratio_vs_nanogpt'] - plain['tokens_per_s'] / nano['tokens_per_s']) < 1e-9


def test_a_folder_without_nanogpt_is_refused_before_anything_runs(tmp_path):
    proc = run([sys.executable, 'bench.py', f'--nanogpt={tmp_path}'], timeout=60)
    line = one_error(proc)
    assert 'train.py, model.py, configurator.py' in line and 'docs/performance.md' in line
