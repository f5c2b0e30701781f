"""bench.py end to end on a tiny model: the plain loop and the real trainer on DeepSpeed, a lever beside the
row it changes, one table, JSON rows."""
import json
import re
import sys

from conftest import ok, run


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
    cost = re.search(r'phase timers: ([\d.]+) us a mark x 9 marks an iteration = [\d.]+ ms, ([\d.]+)% of',
                     proc.stdout)
    # the bound, measured directly
    assert cost and float(cost.group(1)) < 50 and float(cost.group(2)) < 2
