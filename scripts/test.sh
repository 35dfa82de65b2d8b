#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest tests "$@"
