#!/usr/bin/env bash
# Create (or refresh) .venv with the exact versions in constraints.txt. Idempotent: it does nothing
# when the venv already matches constraints.txt and setup.py (a stamp file holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat constraints.txt setup.py | sha256sum | cut -d' ' -f1)
if [[ -x .venv/bin/python && -f $stamp && "$(cat $stamp)" == "$want" ]]; then
  exit 0
fi

# pip prints a warning per package for local index folders this machine's pip.conf names but lacks.
pip_install() {
  local out
  if ! out=$(.venv/bin/python -m pip install --quiet --progress-bar off "$@" 2>&1); then
    echo "$out" >&2
    return 1
  fi
  echo "$out" | grep -v "^WARNING: Location" || true
}

echo "[setup] creating .venv with pinned versions (first run takes about a minute)"
"$PY" -m venv .venv
pip_install --upgrade pip==26.3
# torch first, from its pinned CPU wheel, so nothing resolves a multi-GB CUDA build.
pip_install -c constraints.txt torch
pip_install -c constraints.txt -e ".[dev,mpi]"
echo "$want" > "$stamp"
echo "[setup] .venv ready"
