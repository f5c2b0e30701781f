#!/usr/bin/env bash
# Check the environment, then launch train_deepspeed.py with DeepSpeed.
#
#   ./run_deepspeed_xl.sh                                   # the headline run: gpt2-xl on Shakespeare, every visible GPU
#   CUDA_VISIBLE_DEVICES=0,1 ./run_deepspeed_xl.sh          # only GPUs 0 and 1
#   ./run_deepspeed_xl.sh config/my_run.py --max_iters=100  # a config file and overrides, passed through
#   ./run_deepspeed_xl.sh --hostfile hosts.txt              # several nodes, started over ssh (pdsh)
#   ./run_deepspeed_xl.sh --hostfile hosts.txt --node_rank 1 --master_addr 10.0.0.1   # on each node, no ssh
#   ./run_deepspeed_xl.sh --cpu-demo [--max_iters=500]      # no GPU: the small CPU demo on 2 CPU ranks
#   ./run_deepspeed_xl.sh --dry-run [--plan_gpu_mem_gb=32]  # what fits per GPU; trains nothing, needs no GPU
#
# Options of this script (everything else goes to train_deepspeed.py, whose settings
# `python train_deepspeed.py --help` lists):
#   --cpu-demo           no GPU needed: config/train_shakespeare_char_cpu.py on CPU ranks (gloo), data made first
#   --dry-run            the memory plan per GPU for ZeRO 0-3, and a recommendation; nothing trained or written
#   --num_gpus N         ranks: GPUs (default every visible one), or CPU ranks with --cpu-demo (default 2)
#   --hostfile FILE      several nodes, a "host slots=N" line each; started over ssh unless --node_rank is given
#   --node_rank N        this node's line in FILE, from 0: one command per node, no ssh (needs --master_addr)
#   --master_addr ADDR   node 0's address, with --node_rank
#   --master_port PORT   the port rank 0 listens on (default 29500)
#   -h, --help           this text
# With GPUs it checks them, the settings, the data and the disk, then starts one rank per GPU; without one it
# says so and names --cpu-demo and --dry-run. Each failed check prints one line and exits non-zero before
# anything is launched.
set -euo pipefail
cd "$(dirname "$0")"
fail() { echo "error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0; }  # the comment above

cpu_demo=0; dry_run=0; hostfile=""; node_rank=""; master_addr=""; num_gpus=""; master_port=29500; train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage ;;
    --cpu_demo|--dry_run) fail "$1: did you mean ${1//_/-}? (./run_deepspeed_xl.sh --help lists this script's options)" ;;
    --cpu-demo) cpu_demo=1 ;;
    --dry-run) dry_run=1 ;;
    --hostfile) [ $# -ge 2 ] || fail "--hostfile needs a file"; hostfile="$2"; shift ;;
    --hostfile=*) hostfile="${1#*=}" ;;
    --node_rank) [ $# -ge 2 ] || fail "--node_rank needs a number"; node_rank="$2"; shift ;;
    --node_rank=*) node_rank="${1#*=}" ;;
    --master_addr) [ $# -ge 2 ] || fail "--master_addr needs an address"; master_addr="$2"; shift ;;
    --master_addr=*) master_addr="${1#*=}" ;;
    --num_gpus) [ $# -ge 2 ] || fail "--num_gpus needs a number"; num_gpus="$2"; shift ;;
    --num_gpus=*) num_gpus="${1#*=}" ;;
    --master_port) [ $# -ge 2 ] || fail "--master_port needs a number"; master_port="$2"; shift ;;
    --master_port=*) master_port="${1#*=}" ;;
    *) train_args+=("$1") ;;
  esac
  shift
done
[ -z "$num_gpus" ] || [[ "$num_gpus" =~ ^[1-9][0-9]*$ ]] || fail "--num_gpus $num_gpus: give a whole number of ranks, 1 or more"
# one command per node (--no_ssh): every node names the same hostfile, its own line in it, and node 0's address
per_node=0
if [ -n "$node_rank$master_addr" ]; then
  [ -n "$hostfile" ] && [ -n "$node_rank" ] && [ -n "$master_addr" ] \
    || fail "one command per node needs all three: --hostfile FILE --node_rank N --master_addr ADDR (node 0's address)"
  [[ "$node_rank" =~ ^[0-9]+$ ]] || fail "--node_rank $node_rank: give this node's line number in $hostfile, from 0"
  per_node=1
fi

# Python and DeepSpeed: the project's .venv (made by ./setup.sh) if there is one, else whatever is on PATH
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
command -v python >/dev/null 2>&1 || fail "python not found: run ./setup.sh (makes .venv with everything needed)"
# installed, found without importing it (2 s: the launch imports it anyway)
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)" 2>/dev/null \
  || fail "deepspeed is not importable by $(command -v python): run ./setup.sh, or pip install deepspeed"
command -v deepspeed >/dev/null 2>&1 || fail "the deepspeed launcher is not on PATH: run ./setup.sh, or pip install deepspeed"

# GPUs: DeepSpeed's launcher ignores CUDA_VISIBLE_DEVICES, so it becomes --include localhost:LIST
launch=()
if [ "$cpu_demo" = 1 ]; then
  cores=$(python -c "import os; print(os.cpu_count() or 1)")
  [ -z "$num_gpus" ] || [ "$dry_run" = 1 ] || [ "$num_gpus" -le "$cores" ] \
    || fail "--cpu-demo --num_gpus $num_gpus starts $num_gpus CPU ranks but this machine has $cores CPU core(s): use --num_gpus $cores or fewer"
  [ -f data/shakespeare_char/train.bin ] || python data/shakespeare_char/prepare.py
  train_args=(config/train_shakespeare_char_cpu.py "${train_args[@]}")
  export DS_ACCELERATOR=cpu
fi
if [ -n "$hostfile" ]; then  # the hostfile, this node's slots and the master address, by nanogpt_ds/hosts.py
  cpu=(); [ "$cpu_demo" = 0 ] && [ "${DS_ACCELERATOR:-}" != cpu ] || cpu=(--cpu)  # slots are CPU ranks
  if [ "$per_node" = 1 ]; then
    gpus_desc=$(python -m nanogpt_ds.hosts "$hostfile" "$node_rank" "$master_addr" "$master_port" "${cpu[@]}") || exit 1
    launch=(--hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master_addr")
  else
    command -v pdsh >/dev/null 2>&1 || fail "pdsh not found: DeepSpeed starts the other nodes over ssh with it; install pdsh, or run one command per node (--node_rank N --master_addr ADDR)"
    gpus_desc=$(python -m nanogpt_ds.hosts "$hostfile" "${cpu[@]}") || exit 1
    launch=(--hostfile "$hostfile")
  fi
  world="(the ranks in $hostfile)"
elif [ "$cpu_demo" = 1 ]; then
  launch=(--num_gpus "${num_gpus:-2}")
  gpus_desc="${num_gpus:-2} CPU ranks (gloo)"; world="${num_gpus:-2}"
else
  # torch's count of the machine's GPUs (2 s to import it: asked only here, where the GPUs are chosen)
  physical_gpus=$(env -u CUDA_VISIBLE_DEVICES python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=',' read -r -a wanted <<< "$CUDA_VISIBLE_DEVICES"
    for g in "${wanted[@]}"; do
      [[ "$g" =~ ^[0-9]+$ ]] || fail "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: use GPU indices (0,1,...), this script cannot map '$g'"
      [ "$physical_gpus" -gt 0 ] || fail "CUDA_VISIBLE_DEVICES names GPU $g but this machine has no GPU: unset it, or use --cpu-demo"
      [ "$g" -lt "$physical_gpus" ] || fail "CUDA_VISIBLE_DEVICES names GPU $g but this machine has $physical_gpus GPU(s): list indices from 0 to $((physical_gpus - 1)), or unset it"
    done
    [ -z "$num_gpus" ] || [ "$num_gpus" -le "${#wanted[@]}" ] || fail "--num_gpus $num_gpus but CUDA_VISIBLE_DEVICES lists ${#wanted[@]} GPU(s): use --num_gpus ${#wanted[@]} or fewer, or list more GPUs"
    selected=$(IFS=','; echo "${wanted[*]:0:${num_gpus:-${#wanted[@]}}}")
    launch=(--include "localhost:$selected")
    gpus_desc="GPUs $selected"; world=$(( ${num_gpus:-${#wanted[@]}} ))
  elif [ "$physical_gpus" = 0 ] && [ "$dry_run" = 1 ]; then
    world="${num_gpus:-4}"; gpus_desc="$world GPU(s), planned (none here; --num_gpus N plans for N)"
  elif [ "$physical_gpus" = 0 ]; then
    echo "No GPU visible on this machine: the GPT-2 XL run needs GPUs."
    echo "The same trainer runs for real on CPU: ./run_deepspeed_xl.sh --cpu-demo (a small GPT on 2 CPU ranks, a few minutes)."
    if [ -t 0 ] && [ -t 1 ]; then
      read -r -p "Run the CPU demo now? [y/N] " answer
      [[ "$answer" =~ ^[Yy] ]] && exec "$0" --cpu-demo "${train_args[@]}"
    fi
    exit 1
  else
    [ -z "$num_gpus" ] || [ "$num_gpus" -le "$physical_gpus" ] || fail "--num_gpus $num_gpus but this machine has $physical_gpus GPU(s): use --num_gpus $physical_gpus or fewer"
    launch=(--num_gpus "${num_gpus:-$physical_gpus}")
    gpus_desc="${num_gpus:-$physical_gpus} GPU(s)"; world="${num_gpus:-$physical_gpus}"
  fi
fi

# what will run: the trainer's constants with the config file and overrides applied (bad keys fail here)
settings=$(python configurator.py train_deepspeed.py "${train_args[@]}") || exit 2
get() { python -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$settings" "$1"; }
out_dir=$(get out_dir); ds_config=$(get deepspeed_config); init_from=$(get init_from)
micro=$(get batch_size); accum=$(get gradient_accumulation_steps)

python -c "import json, sys; json.load(open(sys.argv[1]))" "$ds_config" 2>/dev/null \
  || fail "DeepSpeed config $ds_config is missing or not valid JSON (python -m json.tool $ds_config shows where)"
# the data and the disk, by the trainer's own rules (data_sources, checkpoints); a dry run needs no data
data_dir="not checked (a dry run plans without data)"
[ "$dry_run" = 1 ] || data_dir=$(python - "$settings" <<'EOF'
import json, sys
from nanogpt_ds import data_sources
s = json.loads(sys.argv[1])
try:
    sources = data_sources.resolve(s['dataset'], s['block_size'])
except ValueError as e:
    sys.exit(f'error: {e}')
print(', '.join(folder for folder, _ in sources.values()))
EOF
) || exit 1
need_gb=$(python - "$settings" <<'EOF'
import json, sys
from model import GPTConfig, is_pretrained_source, num_params, pretrained_config
from nanogpt_ds import checkpoints
s = json.loads(sys.argv[1])
shape = GPTConfig(n_layer=s['n_layer'], n_head=s['n_head'], n_embd=s['n_embd'], block_size=s['block_size'],
                  vocab_size=50304)
if is_pretrained_source(s['init_from']):
    shape = pretrained_config(s['init_from'])
    shape.block_size = min(s['block_size'], shape.block_size)
print(f"{checkpoints.checkpoint_bytes(num_params(shape), s['dtype']) / 1e9:.1f}")
EOF
)
probe="$out_dir"; while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
free_gb=$(df -Pk "$probe" | awk 'NR==2 {printf "%.1f", $4 / 1e6}')
python -c "import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))" "$free_gb" "$need_gb" \
  || fail "$free_gb GB free under $probe, one checkpoint needs about $need_gb GB: free space or set --out_dir elsewhere"

echo "model:       $init_from"
echo "GPUs:        $gpus_desc"
echo "batch:       train_batch_size = $micro (micro batch) x $accum (accumulation) x $world (world size)"
echo "data:        $data_dir    DeepSpeed config: $ds_config    out_dir: $out_dir ($free_gb GB free, ~$need_gb GB per checkpoint)"
if [ "$dry_run" = 1 ]; then
  [[ "$world" =~ ^[0-9]+$ ]] || fail "--dry-run plans for one node: give --num_gpus N instead of --hostfile"
  echo "running:     python train_deepspeed.py --dry_run=True --plan_gpus=$world ${train_args[*]}"
  exec python train_deepspeed.py --dry_run=True --plan_gpus="$world" "${train_args[@]}"
fi
echo "running:     deepspeed ${launch[*]} --master_port $master_port train_deepspeed.py ${train_args[*]}"
if [ -n "$hostfile" ] && [ "$per_node" = 0 ]; then  # over ssh: DeepSpeed's runner passes a Ctrl-C or SIGTERM on to every node's ranks
  env -u CUDA_VISIBLE_DEVICES deepspeed "${launch[@]}" --master_port "$master_port" train_deepspeed.py "${train_args[@]}"
else
  # This node: a Ctrl-C or SIGTERM to this script goes to its ranks alone (each finishes its step, and every node's
  # ranks save together and exit 0).
  # DeepSpeed's own launcher would give them 30 s before killing them and exit 1; a second signal stops them at once.
  env -u CUDA_VISIBLE_DEVICES setsid deepspeed "${launch[@]}" --master_port "$master_port" train_deepspeed.py \
    "${train_args[@]}" &
  ds=$!
  trap 'pkill -TERM -s "$ds" -f "train_deepspeed.py --local_rank=" || true' TERM INT
  rc=0; wait "$ds" || rc=$?
  while kill -0 "$ds" 2>/dev/null; do rc=0; wait "$ds" || rc=$?; done  # a trapped signal ends a wait early
  [ "$rc" = 0 ] || exit "$rc"
fi
newest=$(python -c "import sys; from nanogpt_ds import checkpoints; print(checkpoints.latest_tag(sys.argv[1]) or 'none')" "$out_dir")
echo "checkpoints: $out_dir ($newest is the newest; resume with --init_from=resume)"
