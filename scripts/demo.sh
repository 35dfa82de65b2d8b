#!/usr/bin/env bash
# The main job: set everything up (idempotent), build the embedded demo dataset (sklearn digits in the
# grey8 format, their native 8x8 grid) if it is missing, train train/configs/demo.yaml (UniMoD, CPU or GPU),
# and print the run summary. Extra arguments go to train/main.py, e.g. --set run.max_steps=50.
# A finished run is not redone: its checkpoint is found (checkpoint.resume=auto) and the summary printed again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
.venv/bin/python train/main.py --config train/configs/demo.yaml --prepare-demo-data "$@"
