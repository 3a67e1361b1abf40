# Sourced by the sbatch scripts in this folder: run_preemptible <srun command...>
#
# Runs the command (an srun step) in the background and waits for it. On SIGUSR1 (the warning SLURM sends
# to the batch script with #SBATCH --signal=B:USR1@<seconds>, or `scancel --batch --signal=USR1 <job>`):
#   1. forward USR1 to every process of the job's steps on every node (`scancel --signal=USR1 <job>`
#      signals the steps, not this script). launch/slurm.py made the launchers (run.py, accelerate,
#      torchrun) ignore USR1, so only the recipe processes act on it: at the next optimizer update all
#      ranks write a checkpoint atomically and exit (code 75);
#   2. when the step has ended, `scontrol requeue` the job. It starts again (same job id, same log,
#      SLURM_RESTART_COUNT+1) and launch/slurm.py passes --resume_from_checkpoint latest.
# A step that finished normally before the signal took effect (exit 0) is not requeued.
# SIGTERM (scancel, the time limit, SLURM's own preemption) is not trapped: SLURM sends it to every
# process itself; inside a job the recipe treats it like USR1 if it gets time to (KillWait / GraceTime).

run_preemptible() {
    preempted=0
    trap '_on_usr1' USR1
    "$@" &
    local pid=$! rc
    while true; do
        wait "$pid"; rc=$?
        # wait returns >128 when a trapped signal interrupts it; the step is still running then
        if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    if [ "$preempted" = 1 ] && [ "$rc" != 0 ]; then
        echo "$(date +%T) step stopped after the signal (exit $rc): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"   # ends this run of the script; the job waits in the queue
        sleep 60                           # (not reached unless requeue is refused, e.g. no --requeue)
        return 1
    fi
    echo "$(date +%T) step finished with exit code $rc"
    return "$rc"
}

_on_usr1() {
    preempted=1
    echo "$(date +%T) USR1: asking the training processes to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
