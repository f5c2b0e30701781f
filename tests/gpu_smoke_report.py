"""The figures of gpu_smoke.sh's small cards and fp16 parts, each line written whatever the others did.
$ python tests/gpu_smoke_report.py WORK_DIR LOG_DIR   (gpu_smoke.sh runs it)"""
import glob
import json
import os
import re
import statistics
import sys

import torch
from conftest import by_iter  # the suite's reader of a run's metrics.jsonl (beside this file)


def card_line(path, log):
    """One capped gpt2-xl run: speed, MFU, the GPU's peak against the plan, host memory, the step's share."""
    cap = re.search(r'xl_(\S+)g\.metrics', path).group(1)
    with open(path) as f:
        steps = [r for r in map(json.loads, f) if 'dt_ms' in r]
    planned = re.search(r'\(([\d.]+) GiB\)', open(f'{log}/plan_xl_{cap}g.log').read())
    timed = steps[2:] or steps

    def median(key):
        return statistics.median(r.get(key) or 0 for r in timed)
    return (f"cap {cap} GiB: {len(steps)} steps, median {median('dt_ms'):.0f} ms/iter, "
            f"{median('tokens_per_s'):,.0f} tok/s, MFU {median('mfu'):.1%}; peak allocated "
            f"{max(r.get('gpu_alloc_mb', 0) for r in steps) / 1024:.1f} GiB (reserved "
            f"{max(r.get('gpu_reserved_mb', 0) for r in steps) / 1024:.1f}) against the plan's "
            f"{planned.group(1) if planned else '?'}; host {max(r['peak_rss_mb'] for r in steps) / 1024:.1f} "
            f"GiB peak resident; the optimizer step {median('step_frac'):.0%} of an iteration")


def fp16_lines(work):
    """The fp16 run and its resume: the loss scale, skipped steps, finite losses, the resume's difference, the
    export's logits against transformers."""
    lines = []
    for run in ('fp16', 'fp16_resumed'):
        if not os.path.isfile(f'{work}/{run}/metrics.jsonl'):
            lines.append(f'{run}: no metrics')
            continue
        loss = by_iter(f'{work}/{run}', 'loss')
        finite = all(abs(v) < float('inf') for v in loss.values())
        lines.append(f"{run}: loss scale by iter {by_iter(f'{work}/{run}', 'loss_scale')}, skipped steps "
                     f"{by_iter(f'{work}/{run}', 'skipped_steps')}, every loss finite: {finite}")
    if len(lines) == 2 and 'no metrics' not in ''.join(lines):
        a, b = by_iter(f'{work}/fp16', 'loss'), by_iter(f'{work}/fp16_resumed', 'loss')
        after = [i for i in b if i >= 10 and i in a]
        worst = max(abs(a[i] - b[i]) for i in after)
        lines.append(f'fp16 resume from iter_10: max |loss difference| {worst:.2e}')
    if os.path.isdir(f'{work}/fp16_exported'):
        from transformers import GPT2LMHeadModel

        from model import GPT, GPTConfig
        ckpt = torch.load(f'{work}/fp16_exported/ckpt.pt', map_location='cpu', weights_only=True)
        ours = GPT(GPTConfig(**ckpt['model_args'])).eval()
        ours.load_state_dict(ckpt['model'])
        hf = GPT2LMHeadModel.from_pretrained(f'{work}/fp16_exported').eval()
        x = torch.randint(0, 50257, (2, ours.config.block_size))
        with torch.no_grad():
            diff = (ours(x)[0][:, -1] - hf(x).logits[:, -1]).abs().max().item()
        lines.append(f'fp16 export: model.py and transformers logits differ by at most {diff:.2e}')
    return lines


work, log = sys.argv[1:]
for name, lines in (('cards', [card_line(p, log) for p in sorted(glob.glob(f'{log}/xl_*.metrics.jsonl'))]),
                    ('fp16', fp16_lines(work))):
    with open(f'{log}/{name}.txt', 'a') as out:
        for line in lines:
            print(line)
            out.write(line + '\n')
