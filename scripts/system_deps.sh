#!/usr/bin/env bash
# Install the Debian packages the tests need (Open MPI for the mpirun tests, munge + Slurm for the
# sbatch tests), idempotently, so a clean Debian 12 CI machine needs nothing but this repository.
#
#   bash scripts/system_deps.sh        # as root: installs what is missing; otherwise explains and exits 0
#
# - Does nothing (and runs no apt-get) when every package is already installed.
# - Runs `apt-get update` at most once, then installs with --no-install-recommends (Slurm pulls ~42
#   packages with recommends, 8 without).
# - Open MPI and libpmix2 are installed in a first transaction, Slurm in a second: slurmd must find
#   libpmix2 when it starts, or `srun --mpi=pmix` fails and leaves a stuck step behind.
# - Not root, or no apt-get: prints why and exits 0, so the tests that need these binaries skip with
#   a stated reason instead of the whole suite failing.
# - A failing apt-get (no network, broken mirror) exits non-zero: on a machine that could install,
#   silently running without MPI/Slurm would hide the skipped tests.
set -euo pipefail

MPI_PACKAGES=(openmpi-bin libopenmpi-dev libpmix2)
SLURM_PACKAGES=(munge slurmctld slurmd slurm-client)

log() { echo "[system-deps] $*"; }

is_installed() {
  # dpkg's status is authoritative; `command -v mpirun` would also accept a pip-installed MPICH.
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing_of() {
  local pkg out=()
  for pkg in "$@"; do
    is_installed "$pkg" || out+=("$pkg")
  done
  echo "${out[@]:-}"
}

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
  log "no apt-get/dpkg on this machine: install Open MPI (${MPI_PACKAGES[*]}) and Slurm" \
      "(${SLURM_PACKAGES[*]}) yourself; the tests that need them will skip"
  exit 0
fi

read -r -a missing_mpi <<<"$(missing_of "${MPI_PACKAGES[@]}")"
read -r -a missing_slurm <<<"$(missing_of "${SLURM_PACKAGES[@]}")"
if (( ${#missing_mpi[@]} == 0 && ${#missing_slurm[@]} == 0 )); then
  log "all present: ${MPI_PACKAGES[*]} ${SLURM_PACKAGES[*]}"
  exit 0
fi

missing_all=("${missing_mpi[@]}" "${missing_slurm[@]}")
if (( EUID != 0 )); then
  log "missing ${missing_all[*]}; not root, so not installing." \
      "Run as root: apt-get install --no-install-recommends ${missing_all[*]}." \
      "The tests that need them will skip."
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Wait for a concurrent apt/dpkg (another engineer, unattended-upgrades) instead of failing at once.
APT=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)

log "apt-get update"
apt-get -o DPkg::Lock::Timeout=300 -q update

if (( ${#missing_mpi[@]} )); then
  log "installing ${missing_mpi[*]}"
  "${APT[@]}" install "${missing_mpi[@]}"
fi
if (( ${#missing_slurm[@]} )); then
  log "installing ${missing_slurm[*]}"
  "${APT[@]}" install "${missing_slurm[@]}"
fi

still_missing="$(missing_of "${MPI_PACKAGES[@]}" "${SLURM_PACKAGES[@]}")"
if [[ -n "$still_missing" ]]; then
  log "ERROR: still missing after apt-get install: $still_missing" >&2
  exit 1
fi
log "installed; mpirun: $(command -v mpirun || echo 'not on PATH')"
