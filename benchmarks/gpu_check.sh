#!/usr/bin/env bash
# One call that exercises fastdit's GPU paths on one CUDA GPU in under 8 minutes, and writes one report.
#
#   benchmarks/gpu_check.sh [--out REPORT] [--work DIR] [--python PY] [--dry-run]
#   make gpu-check                      # the same, REPORT = gpu-check-report.md
#
# Steps, each under its own time limit (the limits add up to 8 minutes; a step that reaches its limit
# is stopped and reported as timed out, and the check goes on):
#   1. the gpu-marked tests                                     (pytest -m gpu)
#   2. fastdit bench train, DiT-XL/2 at 256 px, the GPU rows      (MFU column)
#   3. fastdit bench sample, the same model and rows
#   4. peak memory of DiT-XL/2 at batch 32 with activation checkpointing, fp32 and bf16 (the 24 GB question)
#   5. stand-ins: an SD-VAE-sized AutoencoderKL and a latent store of random moments (no download)
#   6. fastdit train on that store, --compile --precision bf16: 25 steps, then the same command to 50 (resume)
#   7. fastdit sample-ddp of 256 images from the step-50 EMA export, decoded by the stand-in VAE
# --dry-run prints the plan and writes the report with every step "not run"; it needs no GPU.
# Without a CUDA device the script stops before any step (exit 2).
set -u

usage="usage: benchmarks/gpu_check.sh [--out REPORT] [--work DIR] [--python PY] [--dry-run]"
out="gpu-check-report.md"
work=""
python="${PYTHON:-python}"
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--work|--python)
      if [ $# -lt 2 ] || [ -z "$2" ]; then echo "gpu_check: $1 needs a value; $usage" >&2; exit 2; fi
      case "$1" in --out) out="$2" ;; --work) work="$2" ;; --python) python="$2" ;; esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done

out_dir="$(dirname -- "$out")"
if [ ! -d "$out_dir" ] || [ ! -w "$out_dir" ]; then
  echo "gpu_check: cannot write the report '$out': '$out_dir' is not a writable folder; pass --out in one" >&2; exit 2
fi
if ! "$python" -c "import fastdit" 2>/dev/null; then
  echo "gpu_check: '$python' cannot import fastdit; pass --python with the environment's interpreter (e.g. .venv/bin/python)" >&2
  exit 2
fi
if [ $dry_run -eq 0 ] && ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing was run; this check needs one NVIDIA GPU (--dry-run shows the plan)" >&2
  exit 2
fi
work="${work:-$(mktemp -d "${TMPDIR:-/tmp}/fastdit-gpu-check.XXXXXX")}"
mkdir -p "$work/steps" || { echo "gpu_check: cannot create the work folder '$work'" >&2; exit 2; }
rm -f "$work"/steps/*

if [ $dry_run -eq 1 ]; then
  echo "dry run (nothing is executed)" > "$work/device.txt"
else
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1;
    "$python" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')"; } > "$work/device.txt"
fi

step_number=0
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  step_number=$((step_number + 1))
  local stem; stem="$work/steps/$(printf '%02d' "$step_number")-$name"
  printf '%s\n' "$*" > "$stem.cmd"
  echo "[$step_number] $name (limit ${limit}s): $*"
  if [ $dry_run -eq 1 ]; then return 0; fi
  local start end code
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$stem.log" 2>&1
  code=$?
  end=$(date +%s%N)
  echo "$code $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')" > "$stem.status"
  echo "    -> exit $code"
  return $code
}
skip() {  # skip NAME REASON COMMAND...: a step that cannot run because an earlier one failed
  local name="$1" reason="$2"; shift 2
  step_number=$((step_number + 1))
  local stem; stem="$work/steps/$(printf '%02d' "$step_number")-$name"
  printf '%s\n' "$*" > "$stem.cmd"
  [ $dry_run -eq 1 ] || echo "skipped $reason" > "$stem.status"
}

run="$work/runs"
export_file="$run/xl/checkpoints/0000050-ema.safetensors"
train=("$python" -m fastdit train --features-path "$work/store" --model DiT-XL/2 --image-size 256
       --global-batch-size 32 --precision bf16 --compile --ckpt-every 25 --log-every 5 --num-workers 2
       --no-progress --no-tensorboard --results-dir "$run" --run-name xl --device cuda)

step gpu-tests 50 "$python" -m pytest -q -rs -m gpu tests
step bench-train 150 "$python" -m fastdit bench train --device cuda --model DiT-XL/2 --image-size 256
step bench-sample 60 "$python" -m fastdit bench sample --device cuda --model DiT-XL/2 --image-size 256
step memory-xl-batch32-ckpt 40 "$python" -m fastdit bench train --device cuda --model DiT-XL/2 --batch 32 \
  --rows fastdit+ckpt fastdit+bf16+ckpt --warmup 1 --steps 1
if step stand-ins 20 "$python" -m fastdit.bench.gpu_check prepare "$work" || [ $dry_run -eq 1 ]; then
  step train-25-steps 60 "${train[@]}" --max-steps 25
  if step train-resume-to-50 60 "${train[@]}" --max-steps 50 || [ $dry_run -eq 1 ]; then
    step sample-ddp-256 40 "$python" -m fastdit sample-ddp --ckpt "$export_file" --vae "$work/vae" \
      --num-fid-samples 256 --batch-size 64 --num-sampling-steps 50 --out "$work/samples.npz" --no-progress
  else
    skip sample-ddp-256 "no step-50 export" "$python" -m fastdit sample-ddp --ckpt "$export_file"
  fi
else
  skip train-25-steps "no stand-ins" "${train[@]}" --max-steps 25
  skip train-resume-to-50 "no stand-ins" "${train[@]}" --max-steps 50
  skip sample-ddp-256 "no stand-ins" "$python" -m fastdit sample-ddp --ckpt "$export_file"
fi

"$python" -m fastdit.bench.gpu_check report "$work" "$out" || exit 2
echo "work folder: $work"
