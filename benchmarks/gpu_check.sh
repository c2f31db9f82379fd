#!/usr/bin/env bash
# One call that exercises fastdit's GPU paths on one CUDA GPU (two where visible) within a time budget
# (420 s of steps by default, stops included: the whole check stays under 8 minutes), and writes one report.
#
#   benchmarks/gpu_check.sh [--out REPORT] [--work DIR] [--python PY] [--budget SECONDS] [--dry-run]
#   make gpu-check                      # the same, REPORT = gpu-check-report.md (and gpu-check-report.json)
#
# Steps, each under its own time limit and all under the budget (a step starts only with 15 s of the
# budget left, and its limit is cut to what is left; a step that reaches its limit is stopped, keeps
# what it printed, and the check goes on). Correctness first, then the figures:
#   1. the gpu-marked tests                                              (pytest -m gpu)
#   2. stand-ins: an SD-VAE-sized AutoencoderKL and a latent store of random moments (no download)
#   3. fastdit train DiT-XL/2 256 on that store, bf16 + compile, batch 32: 10 steps
#   4. the same command to step 20: a resume
#   5. sample-ddp of 96 images from the step-20 export, on every visible GPU (up to 2): balanced shares
#   6. with two GPUs visible: a 2-process DDP training run of 5 steps
#   7. bench train at the fast settings: bf16 + compile + checkpointing every block, batch 256 (MFU)
#   8. bench train at batch 32: reference (fp32, TF32 on as in the official code), reference+bf16 and
#      fastdit+bf16+compile: the like-for-like ratios
#   9. bench train at batch 32: a compiled MeanFlow step and a compiled REPA step
# Every bench row prints as soon as it is measured. Compiled graphs are cached in WORK/inductor-cache,
# so steps that compile the same graph (3, 4 and 8) compile it once.
# --dry-run prints the plan and writes the report with every step "not run"; it needs no GPU.
# Without a usable CUDA device the script stops before any step (exit 2) and says why in one line.
set -u

usage="usage: benchmarks/gpu_check.sh [--out REPORT] [--work DIR] [--python PY] [--budget SECONDS] [--dry-run]"
out="gpu-check-report.md"
work=""
python="${PYTHON:-python}"
budget=420
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--work|--python|--budget)
      if [ $# -lt 2 ] || [ -z "$2" ]; then echo "gpu_check: $1 needs a value; $usage" >&2; exit 2; fi
      case "$1" in --out) out="$2" ;; --work) work="$2" ;; --python) python="$2" ;; --budget) budget="$2" ;; esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done

case "$budget" in
  ''|*[!0-9]*) echo "gpu_check: --budget must be a whole number of seconds, got '$budget'" >&2; exit 2 ;;
esac
out_dir="$(dirname -- "$out")"
if [ ! -d "$out_dir" ] || [ ! -w "$out_dir" ]; then
  echo "gpu_check: cannot write the report '$out': '$out_dir' is not a writable folder; pass --out in one" >&2; exit 2
fi
if ! "$python" -c "import fastdit" 2>/dev/null; then
  echo "gpu_check: '$python' cannot import fastdit; pass --python with the environment's interpreter (e.g. .venv/bin/python)" >&2
  exit 2
fi
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
if [ $dry_run -eq 0 ]; then
  # One line on what is missing: no GPU, or a torch whose CUDA build the driver is too old for.
  if ! reason="$("$python" -m fastdit.bench.gpu_check doctor --driver "$driver" 2>&1)"; then
    echo "gpu_check: $reason; nothing was run (--dry-run shows the plan)" >&2
    exit 2
  fi
fi
work="${work:-$(mktemp -d "${TMPDIR:-/tmp}/fastdit-gpu-check.XXXXXX")}"
mkdir -p "$work/steps" || { echo "gpu_check: cannot create the work folder '$work'" >&2; exit 2; }
rm -f "$work"/steps/*

gpus=1
if [ $dry_run -eq 1 ]; then
  echo "dry run (nothing is executed)" > "$work/device.txt"
else
  gpus="$("$python" -c "import torch; print(torch.cuda.device_count())")"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1;
    "$python" -c "import torch; print(f'torch {torch.__version__}, built for CUDA {torch.version.cuda}; {torch.cuda.device_count()} GPU(s) visible')"
  } > "$work/device.txt"
fi
echo "$budget" > "$work/budget.txt"

export PYTHONUNBUFFERED=1  # each row reaches the log (and the console) as it is printed
export TORCHINDUCTOR_CACHE_DIR="$work/inductor-cache" TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
started=$(date +%s)
step_number=0
new_step() {  # new_step NAME COMMAND...: number the step and record its command
  step_number=$((step_number + 1))
  stem="$work/steps/$(printf '%02d' "$step_number")-$1"
  shift
  printf '%s\n' "$*" > "$stem.cmd"
}
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  new_step "$name" "$@"
  local left=$((budget - ($(date +%s) - started) - 5))  # 5 s for the KILL after a step's limit
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[$step_number] $name (limit ${limit}s): $*"
  if [ $dry_run -eq 1 ]; then return 0; fi
  if [ "$limit" -lt 15 ]; then
    echo "skipped no time left of the ${budget}-s budget" > "$stem.status"
    echo "    -> skipped: no time left of the ${budget}-s budget"
    return 1
  fi
  echo "$limit" > "$stem.limit"
  local start end code
  start=$(date +%s%N)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$stem.log" | sed 's/^/    /'
  code=${PIPESTATUS[0]}
  end=$(date +%s%N)
  echo "$code $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')" > "$stem.status"
  echo "    -> exit $code"
  return $code
}
skip() {  # skip NAME REASON COMMAND...: a step that cannot run (an earlier one failed, one GPU only)
  local name="$1" reason="$2"; shift 2
  new_step "$name" "$@"
  echo "[$step_number] $name: skipped ($reason)"
  [ $dry_run -eq 1 ] || echo "skipped $reason" > "$stem.status"
}

run="$work/runs"
export_file="$run/xl/checkpoints/0000020-ema.safetensors"
train=("$python" -m fastdit train --features-path "$work/store" --model DiT-XL/2 --image-size 256
       --global-batch-size 32 --precision bf16 --compile --ckpt-every 10 --log-every 5 --num-workers 2
       --no-progress --no-tensorboard --results-dir "$run" --device cuda)
torchrun=("$python" -m torch.distributed.run --standalone)
bench=("$python" -m fastdit bench train --device cuda --model DiT-XL/2 --image-size 256)
sample_gpus=$(( gpus >= 2 ? 2 : 1 ))

step gpu-tests 40 "$python" -m pytest -q -rs -m gpu tests
if step stand-ins 15 "$python" -m fastdit.bench.gpu_check prepare "$work" || [ $dry_run -eq 1 ]; then
  step train-10-steps 50 "${train[@]}" --run-name xl --max-steps 10
  if step train-resume-to-20 35 "${train[@]}" --run-name xl --max-steps 20 || [ $dry_run -eq 1 ]; then
    step sample-ddp 40 "${torchrun[@]}" --nproc_per_node "$sample_gpus" -m fastdit sample-ddp --ckpt "$export_file" \
      --vae "$work/vae" --num-fid-samples 96 --batch-size 16 --chunk-size 64 --num-sampling-steps 25 \
      --out "$work/samples.npz" --no-progress
  else
    skip sample-ddp "no step-20 export" "${torchrun[@]}" -m fastdit sample-ddp --ckpt "$export_file"
  fi
  if [ "$gpus" -ge 2 ] || [ $dry_run -eq 1 ]; then
    step ddp-2-gpus 45 "${torchrun[@]}" --nproc_per_node 2 "${train[@]:1}" --run-name ddp --max-steps 5
  else
    skip ddp-2-gpus "one GPU visible" "${torchrun[@]}" --nproc_per_node 2 "${train[@]:1}" --run-name ddp --max-steps 5
  fi
else
  skip train-10-steps "no stand-ins" "${train[@]}" --run-name xl --max-steps 10
  skip train-resume-to-20 "no stand-ins" "${train[@]}" --run-name xl --max-steps 20
  skip sample-ddp "no stand-ins" "${torchrun[@]}" -m fastdit sample-ddp --ckpt "$export_file"
  skip ddp-2-gpus "no stand-ins" "${torchrun[@]}" --nproc_per_node 2 "${train[@]:1}" --run-name ddp --max-steps 5
fi
step bench-fast-batch256 75 "${bench[@]}" --batch 256 --warmup 2 --steps 3 --rows fastdit+bf16+compile+ckpt
step bench-like-for-like 100 "${bench[@]}" --batch 32 --warmup 2 --steps 3 \
  --rows reference reference+bf16 fastdit+bf16+compile
step bench-meanflow-repa 90 "${bench[@]}" --batch 32 --warmup 2 --steps 3 \
  --rows fastdit+bf16+compile+meanflow fastdit+bf16+compile+repa

"$python" -m fastdit.bench.gpu_check report "$work" "$out" || exit 2
echo "work folder: $work"
