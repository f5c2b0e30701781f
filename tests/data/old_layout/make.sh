#!/usr/bin/env bash
# How the checkpoints beside this file were made: by the trainer of the layout before nanogpt_ds/ (commit
# fb68fbf, every module at the top), so that tests/test_old_runs.py can check that runs saved then still
# resume, export and sample. Kept for the record; run from the repository's root with setup.sh's .venv:
#   tests/data/old_layout/make.sh
set -euo pipefail
repo=$PWD; here=$repo/tests/data/old_layout; old=$(mktemp -d)
git archive fb68fbf | tar -x -C "$old"
rm -rf "$old/data/shakespeare_char" && ln -s "$repo/data/shakespeare_char" "$old/data/shakespeare_char"
cd "$old"
export DS_ACCELERATOR=cpu PATH="$repo/.venv/bin:$PATH"
# the shape is tiny on purpose: the files stay small enough to keep in the repository
run=(--init_from=scratch --dataset=shakespeare_char --n_layer=1 --n_head=2 --n_embd=16 --block_size=16
     --batch_size=4 --gradient_accumulation_steps=1 --dtype=float32 --eval_iters=2 --log_interval=1
     --warmup_iters=2 --learning_rate=3e-3 --min_lr=3e-4 --max_iters=8 --eval_interval=4
     --always_save_checkpoint=True)
launch() { deepspeed --num_gpus 2 --master_port "$1" train_deepspeed.py "${@:2}"; }
rm -rf "$here"/zero2 "$here"/zero3 "$here"/zero3_sigterm
# ZeRO-2: saved at iters 4 and 8; the test resumes iter_4 and compares iters 5-8 with this run's own
launch 29611 "${run[@]}" --out_dir="$here/zero2" > "$here/zero2.log" 2>&1
# ZeRO-3, uninterrupted (the losses a resumed run must log), then stopped by SIGTERM after its 3rd iter
launch 29612 "${run[@]}" --deepspeed_config=ds_config_zero3.json --out_dir="$old/zero3_whole" > /dev/null 2>&1
setsid deepspeed --num_gpus 2 --master_port 29613 train_deepspeed.py "${run[@]}" --max_iters=400 \
  --lr_decay_iters=8 --deepspeed_config=ds_config_zero3.json --out_dir="$here/zero3_sigterm" \
  > "$here/zero3_sigterm.log" 2>&1 &
ds=$!
trained() { grep -c '"loss"' "$here/zero3_sigterm/metrics.jsonl" 2>/dev/null || true; }
until [ "$(trained)" -ge 3 ] 2>/dev/null; do sleep 0.05; done
kill -TERM -- "-$ds"  # the runner, launch.py and both ranks, as a batch system's notice reaches a job
while pgrep -s "$ds" >/dev/null; do sleep 0.1; done
cp "$old/zero3_whole/metrics.jsonl" "$here/zero3_sigterm/uninterrupted_metrics.jsonl"
# DeepSpeed's copies of its zero_to_*.py scripts in each out_dir are not part of what the tests read
rm -f "$here"/*/zero_to_*.py
rm -rf "$old"
du -sh "$here"
