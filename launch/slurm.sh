#!/bin/bash
# magitrain on SLURM: one torchrun per node (c10d rendezvous), checkpoint-and-requeue before the
# time limit or on preemption. Copy this file, edit the #SBATCH lines, then:
#
#   sbatch launch/slurm.sh configs/magi1_4.5b.yaml parallel.dp=16 train.steps=100000
#
# Arguments: the config file, then OmegaConf dotlist overrides (passed to magitrain.train as is).
# parallel.dp x parallel.cp x parallel.tp must equal nodes x processes per node.
#
# Run dir: runs/<job name> (runs/<job name>_<array task> in an array job) unless you pass
# run.dir=...; RUNS_ROOT=/shared/runs moves the default. Logs: the batch log (--output below)
# plus one file per node in <run dir>/logs/.
#
# Time limit / preemption: SLURM sends USR1 to this script --signal seconds before the limit
# (or `scancel --signal=USR1 --batch JOBID` by hand). The trap forwards it to every training
# process; they save a checkpoint at the next step boundary and exit 0; the job then requeues
# itself (`scontrol requeue`, needs --requeue) and the next start resumes with ckpt.resume=auto.
# Pin a checkpoint: pass ckpt.resume=/path/to/run/checkpoints/step_00001000 (or a run dir for
# its newest); it is used until this run has saved checkpoints of its own, then requeues resume
# from those.
#
# Sweeps as an array job: one line of extra overrides per array task in a text file, e.g.
#   printf 'optim.lr=1e-4\noptim.lr=3e-4\n' > sweep.txt
#   sbatch --array=0-1 --export=ALL,SWEEP_FILE=sweep.txt launch/slurm.sh configs/x.yaml
# (task i takes line i+1; each task gets its own run dir).
#
# Environment knobs: NPROC_PER_NODE (default: GPUs on the node, else 1), RDZV_PORT,
# MAX_RESTARTS (torchrun restarts of a failed process group, default 0: SLURM requeues instead),
# PYTHON (default: python on PATH; activate your environment before sbatch, it is exported).
#
#SBATCH --job-name=magitrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch launch/slurm.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ ! -f "$CONFIG" ]; then
    echo "slurm.sh: config file not found: $CONFIG (relative paths start at $PWD)" >&2
    exit 2
fi

# ---- overrides: ours first, so the user's (and the sweep line's) win ----------------------
OVERRIDES=(log.progress=false "$@")
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "${SWEEP_FILE:-}" ]; then
    sweep_line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$SWEEP_FILE")
    if [ -z "$sweep_line" ]; then
        echo "slurm.sh: $SWEEP_FILE has no line $((SLURM_ARRAY_TASK_ID + 1)) for array task $SLURM_ARRAY_TASK_ID" >&2
        exit 2
    fi
    read -r -a sweep_overrides <<<"$sweep_line"
    OVERRIDES+=("${sweep_overrides[@]}")
fi

RUN_DIR=""
PINNED=""
for o in "${OVERRIDES[@]}"; do
    case $o in
    run.dir=*) RUN_DIR=${o#run.dir=} ;;
    ckpt.resume=*) PINNED=${o#ckpt.resume=} ;;
    esac
done
if [ -z "$RUN_DIR" ]; then
    RUN_DIR=${RUNS_ROOT:-runs}/${SLURM_JOB_NAME}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}
    OVERRIDES+=("run.dir=$RUN_DIR")
fi
# Resume from this run's own newest checkpoint whenever it has one (a requeued start);
# a pinned checkpoint only seeds a run that has none yet.
if [ -z "$PINNED" ] || compgen -G "$RUN_DIR/checkpoints/step_*/COMPLETE" >/dev/null; then
    OVERRIDES+=(ckpt.resume=auto)
fi

# ---- topology from SLURM's variables ---------------------------------------------------------
NODES=$SLURM_JOB_NUM_NODES
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1))}
export PYTHONUNBUFFERED=1

# ---- communication ---------------------------------------------------------------------------
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail fast, not hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Name the interface the nodes talk over if the default route is not it (Ethernet/IPoIB):
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
# InfiniBand / RoCE: export NCCL_IB_HCA=mlx5 ; no IB: export NCCL_IB_DISABLE=1

LOG_DIR=$RUN_DIR/logs
mkdir -p "$LOG_DIR"
echo "slurm.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $NODES node(s) x $NPROC_PER_NODE" \
    "process(es), rendezvous $RDZV_HOST:$RDZV_PORT, run dir $RUN_DIR, logs $LOG_DIR"

TRAIN=("${PYTHON:-python}" -m torch.distributed.run
    --nnodes="$NODES" --nproc-per-node="$NPROC_PER_NODE"
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"
    --max-restarts="${MAX_RESTARTS:-0}"
    -m magitrain.train --config "$CONFIG" "${OVERRIDES[@]}")

# Per node: torchrun runs with USR1 ignored (its default action would kill it) and a USR1 that
# reaches this wrapper goes to torchrun's children, the training processes (they install their
# own handler). `cmd & wait` because bash runs traps only while it waits.
NODE_WRAPPER='
(trap "" USR1; exec "$@") &
child=$!
trap "pkill -USR1 -P $child" USR1
wait $child; rc=$?
while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
exit $rc'

STOP_REQUESTED=0
forward_stop() {
    STOP_REQUESTED=1
    echo "slurm.sh: USR1 received, asking training to checkpoint and stop"
    kill -USR1 "${SRUN_PID:-}" 2>/dev/null
}
trap forward_stop USR1

srun --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append \
    --output="$LOG_DIR/%x-%j-node%n.log" \
    bash -c "$NODE_WRAPPER" magitrain-node "${TRAIN[@]}" &
SRUN_PID=$!
wait $SRUN_PID
rc=$?
while kill -0 $SRUN_PID 2>/dev/null; do
    wait $SRUN_PID
    rc=$?
done

if [ "$STOP_REQUESTED" = 1 ] && [ "$rc" = 0 ]; then
    echo "slurm.sh: checkpoint saved, requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
echo "slurm.sh: training exited with $rc"
exit $rc
