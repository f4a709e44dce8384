#!/usr/bin/env bash
# PALM vs the CE baseline, offline on CPU (experiments/palm/README.md). Writes runs/palm/*/report/ and
# experiments/palm/timing.txt. Run from the repository root.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=.venv/bin/python
rm -rf runs/palm/offline runs/palm/ce_offline
run() {  # name config
  local start=$(date +%s)
  nice -n 10 $PY -m robustft fit --config "$2"
  nice -n 10 $PY -m robustft evaluate --config "$2" --ckpt_path "runs/palm/$1/checkpoints/last.ckpt" \
    --report_dir "runs/palm/$1/report"
  echo "$1: $(( $(date +%s) - start )) s (fit + evaluate)" >> experiments/palm/timing.txt
}
: > experiments/palm/timing.txt
run offline configs/palm/cifar10_resnet20_offline.yaml
run ce_offline experiments/palm/ce_cifar10_resnet20_offline.yaml
