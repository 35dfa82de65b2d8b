#!/usr/bin/env bash
# Emu3-scale UniMoD training under Slurm: one training process per GPU on N nodes, preemption-safe.
#
#   sbatch slurm/train_emu3_mod.sh                              # 1 node x 8 GPUs, emu3_8b_unimod.yaml, ZeRO-3 bf16
#   sbatch --nodes=4 --time=72:00:00 slurm/train_emu3_mod.sh    # #SBATCH defaults are overridden on the command line
#   OUTPUT_DIR=runs/exp1 EXTRA_SETS="optim.lr=2e-5 run.max_steps=20000" sbatch slurm/train_emu3_mod.sh
#   # CPU ranks on a machine without GPUs (tests, slurm/local_cluster.sh):
#   CPU_MODE=1 GPUS_PER_NODE=2 CONFIG=train/configs/smoke.yaml PREPARE_DEMO_DATA=1 \
#     sbatch --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --time=15 slurm/train_emu3_mod.sh
#
# Run settings (environment variables; sbatch passes the submitting shell's environment to the job).
# Relative paths are taken from the directory you submit from.
#   CONFIG          run YAML                                [<repo>/train/configs/emu3_8b_unimod.yaml]
#   DS_CONFIG       DeepSpeed JSON ('auto' values come from the YAML)
#                                                           [<repo>/ds_configs/zero3_bf16.json; CPU_MODE=1: zero3_cpu.json]
#   OUTPUT_DIR      run directory (checkpoints, TensorBoard, metrics, logs)   [runs/<CONFIG file stem>]
#   DATA_DIR        dataset directory (data.dataset_dir)    [the config's]
#   EXTRA_SETS      whitespace-separated SECTION.FIELD=VALUE overrides, each passed as --set (no spaces
#                   inside one value), e.g. "optim.lr=2e-5 checkpoint.save_every=100"          [none]
#   RESUME          auto | none | checkpoint path; `auto` continues from the newest complete
#                   checkpoint in OUTPUT_DIR, which is what makes requeue work              [auto]
#   GPUS_PER_NODE   training processes per node: one per GPU (or per CPU rank in CPU_MODE); must equal the
#                   allocation's tasks per node and, on GPUs, the GPUs Slurm gave each node       [8]
#   CPU_MODE        1: CPU ranks, no GPU needed (DS_ACCELERATOR=cpu, run.device=cpu)          [0]
#   PREPARE_DEMO_DATA  1: build the demo dataset into data.dataset_dir if it is missing      [0]
#   MAX_REQUEUES    give up requeueing after this many restarts (a job that cannot make progress
#                   must not cycle forever)                                                  [20]
#   PYTHON          interpreter                             [<repo>/.venv/bin/python if present, else python3]
#   MASTER_PORT     rendezvous port                         [20000 + job id % 10000]
#   SRUN_WAIT       seconds the other ranks may outlive the first one to exit (srun --wait); rank 0
#                   still writes summary.json and the HF export after the others return        [600]
#
# Logs: the job log is Slurm's --output file (below; appended across requeues). Training output is
# also appended to OUTPUT_DIR/logs/train-<job id>.log, and this script's own lines to
# OUTPUT_DIR/logs/job-<job id>.log. TensorBoard: OUTPUT_DIR/tensorboard.
#
# Preemption and time limits: Slurm sends SIGUSR1 five minutes before the time limit (--signal below);
# the trainer checkpoints at the next step and exits 75 (a stop during start-up also exits 75, with nothing
# to save); this script then runs `scontrol requeue`, and the requeued job resumes from that checkpoint
# (RESUME=auto). One process per rank under srun keeps the ranks' 75 as srun's exit code (torchrun would
# turn it into 1; docs/slurm.md, "Launchers and exit code 75"). Exit codes otherwise propagate:
# 0 done, 2 bad setting or configuration, 3 repeated non-finite losses, anything else a crash.
#
#SBATCH --job-name=emu3-unimod
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=48:00:00
# Without "B:" the warning goes to every task of every job step, i.e. straight to the training ranks,
# which handle SIGUSR1 themselves (agreeing on the stop step with an all-reduce). "B:USR1@300" would
# signal only this batch shell, which would then have to forward it through srun.
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

NAME=train_emu3_mod.sh
LOG_FILE=""

log() {
  local line="[$NAME $(date '+%F %T')] $*"
  echo "$line"
  if [[ -n $LOG_FILE ]]; then echo "$line" >>"$LOG_FILE"; fi
}

die() {  # a bad setting: say which and how to fix it, before any rank starts
  local line="[$NAME] ERROR: $*"
  echo "$line" >&2
  if [[ -n $LOG_FILE ]]; then echo "$line" >>"$LOG_FILE"; fi
  exit 2
}

abspath() {  # relative to the submit directory, where the user typed the path
  case $1 in /*) echo "$1" ;; *) echo "${SLURM_SUBMIT_DIR:-$PWD}/$1" ;; esac
}

is_posint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# ----- where we are ----------------------------------------------------------------------------------
[[ -n ${SLURM_JOB_ID:-} ]] || die "SLURM_JOB_ID is not set: submit this script with sbatch (see its header)"

find_repo() {
  # sbatch runs a copy of this script from slurmd's spool, so $0 does not point into the repository.
  # The controller remembers the submitted path (Command=); the submit directory is the fallback.
  local cmd dir
  cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2-)
  for dir in "${cmd:+$(dirname "$(dirname "$cmd")")}" "${SLURM_SUBMIT_DIR:-}"; do
    if [[ -n $dir && -f $dir/train/main.py ]]; then echo "$dir"; return; fi
  done
}
REPO_DIR=${REPO_DIR:-$(find_repo)}
[[ -n $REPO_DIR && -f $REPO_DIR/train/main.py ]] \
  || die "cannot find the repository (train/main.py); set REPO_DIR=/path/to/repo when submitting"

# ----- settings ----------------------------------------------------------------------------------------
CPU_MODE=${CPU_MODE:-0}
[[ $CPU_MODE == 0 || $CPU_MODE == 1 ]] || die "CPU_MODE must be 0 or 1, got '$CPU_MODE'"
PREPARE_DEMO_DATA=${PREPARE_DEMO_DATA:-0}
[[ $PREPARE_DEMO_DATA == 0 || $PREPARE_DEMO_DATA == 1 ]] \
  || die "PREPARE_DEMO_DATA must be 0 or 1, got '$PREPARE_DEMO_DATA'"

CONFIG=$(abspath "${CONFIG:-$REPO_DIR/train/configs/emu3_8b_unimod.yaml}")
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG: no such file (the run YAML, e.g. train/configs/emu3_8b_unimod.yaml)"
if [[ $CPU_MODE == 1 ]]; then default_ds=$REPO_DIR/ds_configs/zero3_cpu.json; else default_ds=$REPO_DIR/ds_configs/zero3_bf16.json; fi
DS_CONFIG=$(abspath "${DS_CONFIG:-$default_ds}")
[[ -f $DS_CONFIG ]] || die "DS_CONFIG=$DS_CONFIG: no such file (a DeepSpeed JSON from ds_configs/)"
config_stem=$(basename "$CONFIG"); config_stem=${config_stem%.*}
OUTPUT_DIR=$(abspath "${OUTPUT_DIR:-runs/$config_stem}")
if [[ -n ${DATA_DIR:-} ]]; then
  DATA_DIR=$(abspath "$DATA_DIR")
  [[ $PREPARE_DEMO_DATA == 1 || -f $DATA_DIR/manifest.json ]] \
    || die "DATA_DIR=$DATA_DIR has no manifest.json (write it with python -m data.prepare, or set PREPARE_DEMO_DATA=1)"
fi
RESUME=${RESUME:-auto}
MAX_REQUEUES=${MAX_REQUEUES:-20}
[[ $MAX_REQUEUES =~ ^[0-9]+$ ]] || die "MAX_REQUEUES must be a non-negative integer, got '$MAX_REQUEUES'"
SRUN_WAIT=${SRUN_WAIT:-600}
is_posint "$SRUN_WAIT" || die "SRUN_WAIT must be a positive integer (seconds), got '$SRUN_WAIT'"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO_DIR/.venv/bin/python ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an executable"

SETS=()
for kv in ${EXTRA_SETS:-}; do  # word splitting on purpose: one override per word
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z0-9_.]+=.+ ]] \
    || die "EXTRA_SETS entry '$kv' is not SECTION.FIELD=VALUE (e.g. optim.lr=2e-5)"
  SETS+=(--set "$kv")
done

# ----- the allocation must match one process per GPU ----------------------------------------------------
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
is_posint "$GPUS_PER_NODE" || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
# SLURM_TASKS_PER_NODE reads "8(x4)" when every node has 8 tasks, "8,4" when they differ.
tasks_per_node=${SLURM_TASKS_PER_NODE:-}
[[ $tasks_per_node =~ ^([0-9]+)(\(x[0-9]+\))?$ ]] \
  || die "the allocation has uneven tasks per node (SLURM_TASKS_PER_NODE=$tasks_per_node): submit with --ntasks-per-node=$GPUS_PER_NODE"
tasks_per_node=${BASH_REMATCH[1]}
[[ $tasks_per_node == "$GPUS_PER_NODE" ]] \
  || die "GPUS_PER_NODE=$GPUS_PER_NODE but the allocation has $tasks_per_node task(s) per node: submit with --ntasks-per-node=$GPUS_PER_NODE, or set GPUS_PER_NODE=$tasks_per_node"
if [[ $CPU_MODE == 0 ]]; then
  gpus=${SLURM_GPUS_ON_NODE:-}
  if [[ -z $gpus && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .); fi
  [[ -n $gpus && $gpus != 0 ]] \
    || die "no GPUs in this allocation (SLURM_GPUS_ON_NODE unset): submit with --gpus-per-node=$GPUS_PER_NODE, or set CPU_MODE=1 for CPU ranks"
  [[ $gpus == "$GPUS_PER_NODE" ]] \
    || die "GPUS_PER_NODE=$GPUS_PER_NODE but Slurm gave this node $gpus GPU(s): submit with --gpus-per-node=$GPUS_PER_NODE"
fi
WORLD=$(( NODES * GPUS_PER_NODE ))

# ----- run directory and logs ----------------------------------------------------------------------------
mkdir -p "$OUTPUT_DIR/logs" || die "cannot create OUTPUT_DIR=$OUTPUT_DIR"
LOG_FILE=$OUTPUT_DIR/logs/job-$SLURM_JOB_ID.log
TRAIN_LOG=$OUTPUT_DIR/logs/train-$SLURM_JOB_ID.log
RESTARTS=${SLURM_RESTART_COUNT:-0}

# Rendezvous: rank 0 runs on the first node of the allocation (srun's block distribution), and train/launch.py
# reads these instead of deriving them itself; the port depends on the job id so that concurrent jobs
# sharing a node do not collide.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
[[ -n $MASTER_ADDR ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
ARGS=(--config "$CONFIG" --deepspeed_config "$DS_CONFIG" --resume "$RESUME" --set "run.output_dir=$OUTPUT_DIR")
if [[ $CPU_MODE == 1 ]]; then
  export DS_ACCELERATOR=cpu
  ARGS+=(--set run.device=cpu)
fi
if [[ -n ${DATA_DIR:-} ]]; then ARGS+=(--set "data.dataset_dir=$DATA_DIR"); fi
if [[ $PREPARE_DEMO_DATA == 1 ]]; then ARGS+=(--prepare-demo-data); fi
ARGS+=("${SETS[@]}")

log "job $SLURM_JOB_ID restart $RESTARTS: $NODES node(s) x $GPUS_PER_NODE = $WORLD rank(s)$([[ $CPU_MODE == 1 ]] && echo ' (CPU mode)'), master $MASTER_ADDR:$MASTER_PORT"
log "config $CONFIG, deepspeed $DS_CONFIG, output $OUTPUT_DIR, resume $RESUME"
log "training output: $TRAIN_LOG"

# A TERM to this shell means Slurm is ending the whole job (scancel, the hard time limit, or preemption,
# after which Slurm requeues a --requeue job by itself): remember it so we do not requeue on top of that.
# The ranks get the same signal from Slurm directly, checkpoint and exit; bash runs this trap once srun returns.
TERMINATED=0
trap 'TERMINATED=1; log "batch shell got SIGTERM: Slurm is ending the job; waiting for the ranks to checkpoint"' TERM
# SIGUSR1 reaches this shell only with `scancel --full` or a B: signal; the ranks get their own copy.
trap 'log "batch shell got SIGUSR1 (ignored here; the ranks handle it)"' USR1

# One srun task per GPU, our SLURM_* mapping in train/launch.py (rank = SLURM_PROCID, local rank =
# SLURM_LOCALID): no ssh between nodes (the deepspeed launcher needs passwordless ssh, DeepSpeed #1603),
# no per-node launcher in between, so Slurm's signals and exit codes reach the Python processes directly.
# --wait: a crashed rank would leave the others blocked in a collective; SRUN_WAIT bounds that.
SRUN=(srun --ntasks="$WORLD" --ntasks-per-node="$GPUS_PER_NODE" --wait="$SRUN_WAIT")
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
{
  echo "===== job $SLURM_JOB_ID restart $RESTARTS $(date '+%F %T') ====="
} >>"$TRAIN_LOG"
# tee ignores TERM so that the ranks' last lines (the checkpoint message) still reach the logs.
"${SRUN[@]}" "$PYTHON" "$REPO_DIR/train/main.py" "${ARGS[@]}" 2>&1 | (trap '' TERM; exec tee -a "$TRAIN_LOG")
rc=${PIPESTATUS[0]}

case $rc in
  0)
    log "training finished (exit 0): $OUTPUT_DIR/summary.json"
    exit 0 ;;
  75)
    if (( TERMINATED )); then
      log "ranks checkpointed and exited 75 while Slurm ends the job; not requeueing (Slurm requeues preempted jobs itself; scancel means stop)"
      exit 75
    fi
    if (( RESTARTS >= MAX_REQUEUES )); then
      log "ERROR: checkpointed (exit 75) but this job already restarted $RESTARTS time(s) (MAX_REQUEUES=$MAX_REQUEUES); not requeueing. Resubmit to continue."
      exit 75
    fi
    log "ranks checkpointed after a stop signal (exit 75); requeueing job $SLURM_JOB_ID to resume from the checkpoint"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
      log "ERROR: scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --no-requeue, or JobRequeue=0?); resubmit to continue"
      exit 75
    fi
    # Slurm now ends this shell and puts the job back in the queue with the same id.
    exit 75 ;;
  2)
    log "ERROR: bad configuration (exit 2); the ranks' message is above and in $TRAIN_LOG"
    exit 2 ;;
  3)
    log "ERROR: stopped after repeated non-finite losses (exit 3); see $TRAIN_LOG"
    exit 3 ;;
  *)
    log "ERROR: training failed with exit code $rc; see $TRAIN_LOG"
    exit "$rc" ;;
esac
