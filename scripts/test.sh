#!/usr/bin/env bash
# Set everything up (idempotent: pinned .venv, Debian's Open MPI and Slurm when root) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest tests "$@"
