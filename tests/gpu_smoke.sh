#!/usr/bin/env bash
# The GPU smoke: what CI (CPU only) cannot check, in one go on one GPU, each step logged apart and a failed
# step not stopping the next. The parts, chosen by PARTS (default 'basic cards fp16 bench'):
#   basic  the gpt2 shape from scratch in bf16 on Shakespeare (GPT-2 BPE), ZeRO-2 and ZeRO-3 for 20 iterations
#          each; a resume from iter_10 against the run that went on; an export of the ZeRO-3 run checked
#          against transformers and sampled; the dry run's plan against torch.cuda.max_memory_allocated
#   cards  gpt2-xl's shape on emulated small cards (CAPS, GiB, default '24 16 12'): the dry run's
#          recommendation for each, run as printed for 10 steps under --gpu_mem_cap_gb
#   fp16   the gpt2 shape in fp16: loss scale, skipped steps, a resume, the export against transformers
#   bench  bench.py --gpu_shapes=True, one round: the plain loop eager and compiled, ZeRO 0/2/3, compile
# tests/gpu_smoke_report.py writes the cards' and fp16's figures to cards.txt and fp16.txt in LOG_DIR.
# $ python data/shakespeare/prepare.py && python data/shakespeare_char/prepare.py
# $ tests/gpu_smoke.sh [LOG_DIR]     # PYTHON=... to pick the interpreter; STEP_TIMEOUT_S per step (240)
# A rehearsal on CPU in a few minutes (fp16 then stops at its one-line refusal, and no cap is set):
# $ SMOKE_ARGS='--n_layer=2 --n_head=2 --n_embd=64 --block_size=64' CAPS=1 XL_ARGS='--n_layer=2 --n_head=2
#   --n_embd=64 --block_size=64 --gradient_accumulation_steps=2' PYTHON=.venv/bin/python tests/gpu_smoke.sh
set -u
case "${1:-}" in -h|--help) sed -n '2,/^set -u/{/^set -u/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac  # the comment above
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${1:-gpu-smoke-logs}
WORK=$(mktemp -d)
mkdir -p "$LOG"
: > "$LOG/summary.txt"
export PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: its output in LOG/NAME.log, its exit status and seconds in summary.txt
    local name=$1 t0=$SECONDS rc
    shift
    timeout "${STEP_TIMEOUT_S:-240}" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$LOG/summary.txt"
    if [ "$rc" != 0 ]; then tail -n 25 "$LOG/$name.log"; fi
}

RUN=(--dataset=shakespeare --dtype=bfloat16 --batch_size=8 --gradient_accumulation_steps=4
     --learning_rate=6e-4 --min_lr=6e-5 --warmup_iters=2 --max_iters=20 --lr_decay_iters=20 --eval_interval=10
     --eval_iters=5 --always_save_checkpoint=True --progress=False ${SMOKE_ARGS:-})
DEEPSPEED=(env "PATH=$(dirname "$(command -v "$PY")"):$PATH" deepspeed --num_gpus 1 train_deepspeed.py)

step versions "$PY" -c "import torch, deepspeed, transformers; print(torch.__version__, deepspeed.__version__,
transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(),
torch.backends.cpu.get_cpu_capability())"
has_gpu=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)
in_parts() { [[ " ${PARTS:-basic cards fp16 bench} " == *" $1 "* ]]; }

if in_parts basic; then
for stage in 2 3; do
    zero=--deepspeed_config=ds_config_zero$stage.json
    step "plan_zero$stage" "$PY" train_deepspeed.py --init_from=scratch "${RUN[@]}" "$zero" --dry_run=True
    step "zero$stage" "${DEEPSPEED[@]}" --init_from=scratch "${RUN[@]}" "$zero" --out_dir="$WORK/zero$stage"
done
cp -r "$WORK/zero2" "$WORK/resumed"
step resume "${DEEPSPEED[@]}" "${RUN[@]}" --out_dir="$WORK/resumed" --init_from=resume --resume_tag=iter_10
step export "$PY" export.py --out_dir="$WORK/zero3" --export_dir="$WORK/exported"
step sample "$PY" sample.py --init_from="$WORK/exported" --num_samples=1 --max_new_tokens=40
step compare "$PY" - "$WORK" "$LOG" <<'EOF'
"""The figures: losses, resume, export against transformers, the plan against the measured peak."""
import os, re, sys
import torch
from transformers import GPT2LMHeadModel
sys.path.insert(0, 'tests')
from conftest import metrics  # the suite's readers of a run's metrics.jsonl
from conftest import by_iter as by_iter_of
from model import GPT, GPTConfig
work, log = sys.argv[1:]
device = 'cuda' if torch.cuda.is_available() else 'cpu'

def by_iter(run, key):
    return by_iter_of(os.path.join(work, run), key)

for run in ('zero2', 'zero3'):
    steps = [r for r in metrics(os.path.join(work, run)) if 'dt_ms' in r]
    ms = sorted(r['dt_ms'] for r in steps[3:])[len(steps[3:]) // 2]
    peak = max(r.get('gpu_alloc_mb', 0) for r in steps) / 1024
    reserved = max(r.get('gpu_reserved_mb', 0) for r in steps) / 1024
    plan = open(f'{log}/plan_{run}.log').read()
    planned = re.search(r'^\s+%s\s+none\s+\S+ x \S+(?:\s+\S+){3}\s+(\S+)' % run[-1], plan, re.M)
    planned = planned.group(1) if planned else '?'
    unit = 'MiB' if 'MiB per GPU' in plan else 'GiB'
    loss = by_iter(run, 'loss')
    val = by_iter(run, 'val_loss')
    print(f'{run}: loss {loss[0]:.3f} -> {loss[max(loss)]:.3f}, val {val}, median {ms:.0f} ms/iter after 3,')
    print(f"  peak allocated {peak:.1f} GiB (reserved {reserved:.1f}), the plan's total {planned} {unit}")
a, b = by_iter('zero2', 'loss'), by_iter('resumed', 'loss')
after = [i for i in b if i >= 10]
print(f'resume from iter_10: max |loss difference| over iters {min(after)}-{max(after)}:',
      max(abs(a[i] - b[i]) for i in after))
ckpt = torch.load(f'{work}/exported/ckpt.pt', map_location=device, weights_only=True)
ours = GPT(GPTConfig(**ckpt['model_args'])).to(device).eval()
ours.load_state_dict(ckpt['model'])
hf = GPT2LMHeadModel.from_pretrained(f'{work}/exported').to(device).eval()
x = torch.randint(0, 50257, (2, ours.config.block_size), device=device)
with torch.no_grad():
    diff = (ours(x)[0][:, -1] - hf(x).logits[:, -1]).abs().max().item()
print(f'export: model.py and transformers logits differ by at most {diff:.2e} (fp32 on {device})')
EOF
fi

# small cards: gpt2-xl's shape (no weights on the device), 32 sequences of 1024 a step, each cap's recommendation
XL=(--init_from=scratch --n_layer=48 --n_head=25 --n_embd=1600 --block_size=1024 --dataset=shakespeare
    --dtype=bfloat16 --batch_size=1 --gradient_accumulation_steps=32 --max_iters=10 --eval_interval=1000
    --eval_iters=1 --warmup_iters=2 --progress=False ${XL_ARGS:-})
if in_parts cards; then
    for cap in ${CAPS:-24 16 12}; do
        step "plan_xl_${cap}g" "$PY" train_deepspeed.py "${XL[@]}" --dry_run=True --plan_gpus=1 \
            --plan_gpu_mem_gb="$cap"
        advice=$(grep '^recommended for' "$LOG/plan_xl_${cap}g.log")
        echo "cap $cap GiB: ${advice:-no plan}" >> "$LOG/cards.txt"
        if [[ -z "$advice" || "$advice" == *'nothing fits'* ]]; then continue; fi
        read -r -a overrides <<< "$(grep -o -- '--[a-z_]*=[^ ]*' <<< "$advice" | tr '\n' ' ')"
        cap_arg=(--gpu_mem_cap_gb="$cap")
        if [ "$has_gpu" != 1 ]; then cap_arg=(); fi  # a CPU rehearsal: a cap is refused there
        out="${XL_OUT:-$WORK}/xl_${cap}g"  # a gpt2-xl checkpoint is ~21 GB: removed once its figures are kept
        step "xl_${cap}g" "${DEEPSPEED[@]}" "${XL[@]}" "${overrides[@]}" "${cap_arg[@]}" --out_dir="$out"
        cp "$out/metrics.jsonl" "$LOG/xl_${cap}g.metrics.jsonl" 2>/dev/null
        rm -rf "$out"
    done
fi
if in_parts fp16; then
    step fp16 "${DEEPSPEED[@]}" --init_from=scratch "${RUN[@]}" --dtype=float16 --out_dir="$WORK/fp16"
    cp -r "$WORK/fp16" "$WORK/fp16_resumed" 2>/dev/null
    step fp16_resume "${DEEPSPEED[@]}" "${RUN[@]}" --dtype=float16 --out_dir="$WORK/fp16_resumed" \
        --init_from=resume --resume_tag=iter_10
    step fp16_export "$PY" export.py --out_dir="$WORK/fp16" --export_dir="$WORK/fp16_exported"
fi
step report "$PY" tests/gpu_smoke_report.py "$WORK" "$LOG"
if in_parts bench; then
    STEP_TIMEOUT_S=${BENCH_TIMEOUT_S:-300} step bench "$PY" bench.py --gpu_shapes=True --dataset=shakespeare \
        --worlds=1 --stages="${BENCH_STAGES:-0,2,3}" --levers="${BENCH_LEVERS:-compile}" --repeats=1 --iters=5 \
        --warmup_iters=2 --json="$LOG/bench.json"
fi
rm -rf "$WORK"
cat "$LOG/compare.log" "$LOG/cards.txt" "$LOG/fp16.txt" "$LOG/bench.log" 2>/dev/null | grep -v -i warn | tail -n 40
