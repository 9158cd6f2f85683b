# Sourced by scripts/slurm/*.sbatch after they have found the repository ($ROOT). Each function reads SLURM_* and
# NEST_* from the environment, so tests/test_slurm_scripts.py runs them with fake values and a fake scontrol.
# Knobs: CONFIG, NPROC_PER_NODE, OMP_NUM_THREADS, MASTER_PORT, NEST_EXP_DIR, NEST_SSL_PYTHON (README, "SLURM").

REQUEUE_EXIT_CODE=75  # nest_ssl.train.REQUEUE_EXIT_CODE: preempted, checkpoint written (plain python / srun only)

nest_log() { echo "nest_ssl: $*"; }
nest_die() { echo "nest_ssl: error: $*" >&2; exit 1; }

nest_is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

# The interpreter: $NEST_SSL_PYTHON, else the repository's .venv (activated, so its tools are on PATH for
# `pipe:` shard commands too), else python3 on PATH. torchrun runs as `$PY -m torch.distributed.run`, so no
# torchrun needs to be on PATH.
nest_python() {
    if [ -n "${NEST_SSL_PYTHON:-}" ]; then
        PY=$NEST_SSL_PYTHON
        nest_log "python $PY (NEST_SSL_PYTHON)"
    elif [ -f "$ROOT/.venv/bin/activate" ]; then
        source "$ROOT/.venv/bin/activate"
        PY=$ROOT/.venv/bin/python
        nest_log "python $PY (activated $ROOT/.venv)"
    else
        PY=$(command -v python3) || nest_die "no $ROOT/.venv, no python3 on PATH; set NEST_SSL_PYTHON=/path/to/python"
        nest_log "python $PY (python3 on PATH: no $ROOT/.venv; set NEST_SSL_PYTHON to choose)"
    fi
    [ -x "$PY" ] || nest_die "python '$PY' is not an executable file (NEST_SSL_PYTHON or $ROOT/.venv)"
    # this repository's nest_ssl, not another checkout's that the interpreter may have installed (pip -e)
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
}

# Processes per node: $NPROC_PER_NODE, else the GPUs SLURM gave this node, else 1 (a CPU-only node).
nest_nproc() {
    NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    nest_is_count "$NPROC" || nest_die "NPROC_PER_NODE='$NPROC' is not a positive integer"
}

# CPU threads per rank: the user's OMP_NUM_THREADS, else the task's CPUs shared by the ranks (at least 1).
nest_threads() {
    if [ -z "${OMP_NUM_THREADS:-}" ]; then
        OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$NPROC} / NPROC ))
        (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    fi
    nest_is_count "$OMP_NUM_THREADS" || nest_die "OMP_NUM_THREADS='$OMP_NUM_THREADS' is not a positive integer"
    export OMP_NUM_THREADS
}

# Rendezvous port: $MASTER_PORT, else one per job (10000-29999, below Linux's ephemeral range), so two jobs on
# one node do not both take torchrun's 29500. A requeued job keeps its id and so its port.
nest_port() {
    [ -n "${MASTER_PORT:-}${SLURM_JOB_ID:-}" ] || nest_die "neither SLURM_JOB_ID nor MASTER_PORT is set (submit with sbatch)"
    PORT=${MASTER_PORT:-$(( 10000 + SLURM_JOB_ID % 20000 ))}
    nest_is_count "$PORT" && (( PORT < 65536 )) || nest_die "MASTER_PORT='$PORT' is not a port number"
}

# The experiment directory ($NEST_EXP_DIR, else <repo>/nemo_experiments: never the submit directory by accident)
# and the two files the job and the trainer share in it:
#   NEST_PREEMPT_FILE    the batch shell touches it on SIGUSR1/SIGTERM; every rank checks it after each step
#   NEST_REQUEUE_MARKER  rank 0 writes it after the preemption checkpoint; the job requeues iff it exists (or rc 75)
nest_run_dir() {
    EXP_DIR=${NEST_EXP_DIR:-$ROOT/nemo_experiments}
    mkdir -p "$EXP_DIR" || nest_die "cannot create the experiment directory '$EXP_DIR' (NEST_EXP_DIR)"
    EXP_DIR=$(cd "$EXP_DIR" && pwd)
    export NEST_PREEMPT_FILE=$EXP_DIR/.nest_preempt_${SLURM_JOB_ID:-0}
    export NEST_REQUEUE_MARKER=$EXP_DIR/.nest_requeue_${SLURM_JOB_ID:-0}
    rm -f "$NEST_PREEMPT_FILE" "$NEST_REQUEUE_MARKER"
}

# CONFIG relative to the submit directory if it exists there, else to the repository.
nest_config() {
    CONFIG=${CONFIG:-configs/nest_fast-conformer.yaml}
    [ -f "$CONFIG" ] || CONFIG=$ROOT/$CONFIG
    [ -f "$CONFIG" ] || nest_die "CONFIG '$CONFIG' not found (a path relative to $PWD or to $ROOT)"
}

# Everything the launch needs, logged in the job's first lines.
nest_setup() {
    nest_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname), repo $ROOT ($ROOT_FROM), cwd $PWD"
    nest_python
    nest_nproc
    nest_threads
    nest_port
    nest_run_dir
    nest_config
    nest_log "config $CONFIG; $NPROC process(es) per node x OMP_NUM_THREADS=$OMP_NUM_THREADS; port $PORT; runs in $EXP_DIR"
}

# Run the command (srun ...) and requeue the job if the trainer was preempted. A signal may reach the batch shell
# (--signal=B:USR1, scancel -b) or only the job step (scancel --signal=TERM / -s USR1, the time limit's TERM):
# either way rank 0 leaves NEST_REQUEUE_MARKER after its checkpoint, and that file (not the exit code, which
# torchrun turns from 75 into 1) decides.
nest_launch() {
    trap 'nest_log "signal: asking the ranks to checkpoint"; touch "$NEST_PREEMPT_FILE"' USR1 TERM
    "$@" &
    local pid=$! rc=0
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait again until the step ends
        wait "$pid"; rc=$?
    done
    trap - USR1 TERM
    nest_finish "$rc"
}

nest_finish() {
    local rc=$1
    rm -f "$NEST_PREEMPT_FILE"
    if [ -f "$NEST_REQUEUE_MARKER" ] || [ "$rc" -eq "$REQUEUE_EXIT_CODE" ]; then
        nest_log "preempted ($(cat "$NEST_REQUEUE_MARKER" 2>/dev/null || echo "exit $rc")): requeueing job $SLURM_JOB_ID; it resumes from the -last checkpoint"
        rm -f "$NEST_REQUEUE_MARKER"
        scontrol requeue "$SLURM_JOB_ID" || nest_die "scontrol requeue $SLURM_JOB_ID failed (is the job requeueable?)"
        exit 0
    fi
    nest_log "trainer exited with $rc"
    exit "$rc"
}

# The wrapper srun starts on each node: torchrun ignores SIGUSR1 (it is not among the signals torchrun handles, so
# `scancel -s USR1` would kill it and its workers); the workers install their own handler (distributed.Preemption).
NEST_IGNORE_USR1=(bash -c 'trap "" USR1; exec "$@"' nest_ssl)
