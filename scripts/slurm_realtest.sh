#!/usr/bin/env bash
# scripts/slurm_array.sh on a real SLURM: a single-node cluster that exists only for this test.
#
#   bash scripts/slurm_realtest.sh        # as root, with pacs_numba's Python on PATH
#
# Exit status: 0 every check passed; 1 a check failed (the log says which); 77 this machine
# cannot run it (not root, no cgroup v1 memory controller, SLURM missing and apt unreachable),
# with one line saying why.  .ci/run turns 77 into a note and anything else into a failure.
# A failed apt-get is retried a few times; under CI=true, where the machine could run the
# test (root, cgroup v1 memory controller, apt-get), a download that keeps failing is a
# failure (exit 1), never a skip: a CI that could run it must not report it as not run.
#
# What it does:
#  1. installs Debian's slurm-wlm and munge when they are missing (and, for sacct, slurmdbd
#     and mariadb-server; PACS_SLURM_TEST_ACCOUNTING=0 leaves accounting out);
#  2. writes slurm.conf, cgroup.conf (and slurmdbd.conf) into a temporary folder, with this
#     node's CPUs and RealMemory from `slurmd -C`, free ports and private state, log and pid
#     files, so nothing of a SLURM already on the machine is read or touched;
#  3. starts its own munged (private socket), MariaDB (private data folder) and slurmdbd,
#     slurmctld and slurmd;
#  4. checks, on a cohort from `pacs-numba make-cohort`:
#     a. `slurm_array.sh --list` prints an sbatch line with --cpus-per-task and --mem; that
#        line, submitted as printed, runs every task, and the outputs equal a plain
#        `pacs-numba train` (byte for byte, timing files aside); each summary names its job
#        JOB_TASK and reports sacct's sampled MaxRSS beside the exact peak;
#     b. a --mem too small for one patient ends with exit 3 and pacs-numba's message, not
#        an OOM kill;
#     c. --mem-per-cpu on the command line, and SBATCH_MEM_PER_CPU in the environment, work;
#     d. a task cancelled with scancel mid-run, then resubmitted, resumes and ends with the
#        outputs of a plain run;
#  5. cancels its jobs and stops every daemon it started, by pid, and removes the cgroup
#     folders slurmd made.
#
# Knobs: PACS_SLURM_TEST_ACCOUNTING=0 (no slurmdbd/MariaDB, no sacct checks),
# PACS_SLURM_TEST_KEEP=1 (keep the temporary folder: logs, job output, configs),
# PACS_SLURM_TEST_APT_TRIES (default 4) and PACS_SLURM_TEST_APT_WAIT (seconds before the
# second try, growing linearly; default 10) for the package download.
# It takes a few minutes on 2 cores; most of it is Python start-up in each job.

set -euo pipefail

SKIP=77
REPO=$(cd "$(dirname "$0")/.." && pwd)
ARRAY=$REPO/scripts/slurm_array.sh
ACCOUNTING=${PACS_SLURM_TEST_ACCOUNTING:-1}
T0=$SECONDS

say() { printf '%s slurm_realtest: %s\n' "$(date '+%H:%M:%S')" "$*" >&2; }
skip() {
    say "SKIPPED (cannot run here): $*"
    exit "$SKIP"
}
fail() {
    say "FAILED: $*"
    exit 1
}
APT_TRIES=${PACS_SLURM_TEST_APT_TRIES:-4}
APT_WAIT=${PACS_SLURM_TEST_APT_WAIT:-10}
apt_retry() {  # apt_retry COMMAND...: run an apt-get step, retried; its output goes to $apt_log
    local try
    for ((try = 1; ; try++)); do
        if "$@" >"$apt_log" 2>&1; then return 0; fi
        if ((try >= APT_TRIES)); then
            say "'$*' failed $try time(s); its last output:"
            tail -n 5 "$apt_log" >&2 || true
            return 1
        fi
        say "'$*' failed (try $try of $APT_TRIES); retrying in $((APT_WAIT * try)) s"
        sleep $((APT_WAIT * try))
    done
}
check() {  # check DESCRIPTION COMMAND...: run a check, fail with its description
    local what=$1
    shift
    if "$@"; then say "ok: $what"; else fail "$what"; fi
}

# ------------------------------------------------------------------ can it run here?
[[ $(uname -s) == Linux ]] || skip "needs Linux"
((EUID == 0)) || skip "needs root (it installs packages and starts slurmd, which runs jobs)"
if [[ ! -d /sys/fs/cgroup/memory ]]; then
    skip "needs the cgroup v1 memory controller at /sys/fs/cgroup/memory (task/cgroup" \
        "enforces --mem there; cgroup v2 is not set up by this test)"
fi
probe=/sys/fs/cgroup/memory/pacs_realtest_probe.$$
if ! mkdir "$probe" 2>/dev/null; then
    skip "cannot create a cgroup under /sys/fs/cgroup/memory (read-only or not delegated)"
fi
rmdir "$probe"
if pgrep -x slurmd >/dev/null 2>&1; then
    skip "a slurmd already runs on this machine; a second one would share its cgroups and node"
fi
PY=$(command -v python || command -v python3 || true)
[[ -n $PY ]] && "$PY" -c "import pacs_numba" 2>/dev/null ||
    fail "no python with pacs_numba on PATH: activate the environment under test first"

need_pkgs=()
for cmd in slurmctld slurmd sbatch munged; do
    if ! command -v "$cmd" >/dev/null; then need_pkgs+=(slurm-wlm munge); break; fi
done
if [[ $ACCOUNTING == 1 ]]; then
    command -v slurmdbd >/dev/null || need_pkgs+=(slurmdbd)
    command -v mariadbd >/dev/null || need_pkgs+=(mariadb-server)
fi
if ((${#need_pkgs[@]})); then
    command -v apt-get >/dev/null || skip "SLURM is not installed and there is no apt-get"
    say "installing ${need_pkgs[*]} (apt-get)"
    apt_log=$(mktemp /tmp/pacs_slurm_apt.XXXXXX)
    if ! apt_retry apt-get update -q; then
        rm -f "$apt_log"
        # this machine could run the test (root, cgroup v1, apt-get): under CI not running it
        # would hide a broken SLURM path behind a network hiccup
        [[ ${CI:-} == true ]] &&
            fail "apt-get update failed $APT_TRIES times under CI=true; this machine can run" \
                "the test (root, cgroup v1 memory controller, apt-get), so that is a failure"
        skip "SLURM is not installed and apt-get update failed $APT_TRIES times"
    fi
    if ! apt_retry env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}"
    then
        rm -f "$apt_log"
        fail "apt-get install ${need_pkgs[*]} failed $APT_TRIES times"
    fi
    rm -f "$apt_log"
fi
for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null || fail "$cmd is still missing after installing slurm-wlm"
done
say "$(slurmd -V), $(munged --version 2>&1 | head -1)"

# ------------------------------------------------------------------ the cluster's files
WORK=$(mktemp -d /tmp/pacs_slurm_test.XXXXXX)
chmod 755 "$WORK"
ETC=$WORK/etc
mkdir -p "$ETC" "$WORK"/{state,spool,log,run,munge,out,runs}
chown slurm:slurm "$WORK"/{state,log,run}
chown munge:munge "$WORK/munge"
chmod 755 "$WORK/munge"  # the socket must be reachable by every user; the key stays in /etc
NODE_LINE=$(slurmd -C | head -1)
NODE=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$NODE_LINE")
[[ -n $NODE ]] || fail "cannot read the node from slurmd -C: $NODE_LINE"
read -r P_CTLD P_SLURMD P_DBD P_SQL < <("$PY" - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
CGROUP_DIRS=()  # slurmd's cgroup folders that did not exist before
for ctl in memory cpuset freezer cpuacct devices; do
    d=/sys/fs/cgroup/$ctl/slurm_$NODE
    [[ -d $d ]] || CGROUP_DIRS+=("$d")
    d=/sys/fs/cgroup/$ctl/slurm
    [[ -d $d ]] || CGROUP_DIRS+=("$d")
done

MUNGE_SOCKET=$WORK/munge/munge.socket
export SLURM_CONF=$ETC/slurm.conf
cat >"$SLURM_CONF" <<EOF
ClusterName=pacstest
SlurmctldHost=$NODE
SlurmUser=slurm
SlurmctldPort=$P_CTLD
SlurmdPort=$P_SLURMD
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/cgroup
JobAcctGatherFrequency=task=1
JobCompType=jobcomp/none
KillWait=10
InactiveLimit=0
MinJobAge=600
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if [[ $ACCOUNTING == 1 ]]; then
    cat >>"$SLURM_CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$P_DBD
AccountingStoragePass=$MUNGE_SOCKET
EOF
else
    echo "AccountingStorageType=accounting_storage/none" >>"$SLURM_CONF"
fi
cat >"$ETC/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainCores=yes
ConstrainDevices=no
EOF
chmod 644 "$SLURM_CONF" "$ETC/cgroup.conf"

# ------------------------------------------------------------------ start and stop
DAEMONS=()  # "name pid" of every daemon started here, in start order
JOBS=()
started() { DAEMONS+=("$1 $2"); say "started $1 (pid $2)"; }
pid_from() {  # pid_from FILE: wait up to 20 s for a daemon's pid file
    local i
    for ((i = 0; i < 200; i++)); do
        if [[ -s $1 ]]; then cat "$1"; return 0; fi
        sleep 0.1
    done
    return 1
}
cleanup() {
    local rc=$? i entry name pid d
    set +e
    if ((${#JOBS[@]})); then scancel "${JOBS[@]}" 2>/dev/null; sleep 1; fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do  # the reverse of the start order
        read -r name pid <<<"${DAEMONS[i]}"
        kill "$pid" 2>/dev/null || continue
        n=0
        while kill -0 "$pid" 2>/dev/null && ((n++ < 300)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) still running after 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        say "stopped $name (pid $pid)"
    done
    for d in "${CGROUP_DIRS[@]}"; do  # deepest first; only folders slurmd made
        if [[ -d $d ]]; then
            find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
        fi
    done
    if [[ ${PACS_SLURM_TEST_KEEP:-0} == 1 || $rc != 0 ]]; then
        say "kept $WORK (logs in $WORK/log, job output in $WORK/out)"
    else
        rm -rf "$WORK"
    fi
    say "finished in $((SECONDS - T0)) s, exit $rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ -s /etc/munge/munge.key ]] || {
    mungekey --create && chown munge:munge /etc/munge/munge.key &&
        chmod 600 /etc/munge/munge.key
} || fail "no /etc/munge/munge.key and mungekey could not create one"
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$WORK/munge/munged.pid" \
    --log-file="$WORK/munge/munged.log" --seed-file="$WORK/munge/munged.seed" ||
    fail "munged did not start (see $WORK/munge/munged.log)"
started munged "$(pid_from "$WORK/munge/munged.pid")"
munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null || fail "munge does not work"

if [[ $ACCOUNTING == 1 ]]; then
    SQL=$WORK/mysql
    mkdir -p "$SQL"
    chown mysql:mysql "$SQL"
    mariadb-install-db --user=mysql --datadir="$SQL/data" --skip-test-db \
        >"$WORK/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed (see $WORK/log)"
    mariadbd --user=mysql --datadir="$SQL/data" --socket="$SQL/mysqld.sock" \
        --pid-file="$SQL/mariadbd.pid" --port="$P_SQL" --bind-address=127.0.0.1 \
        --skip-name-resolve >"$WORK/log/mariadb.log" 2>&1 &
    started mariadbd $!
    for ((i = 0; i < 300; i++)); do
        mariadb --socket="$SQL/mysqld.sock" -e 'SELECT 1' >/dev/null 2>&1 && break
        sleep 0.2
    done
    mariadb --socket="$SQL/mysqld.sock" -e "CREATE DATABASE slurm_acct_db;
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'pacstest';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" ||
        fail "MariaDB did not start or refused the setup (see $WORK/log/mariadb.log)"
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$P_DBD
SlurmUser=slurm
LogFile=$WORK/log/slurmdbd.log
PidFile=$WORK/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$P_SQL
StorageUser=slurm
StoragePass=pacstest
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$ETC/slurmdbd.conf"
    chmod 600 "$ETC/slurmdbd.conf"
    slurmdbd || fail "slurmdbd did not start (see $WORK/log/slurmdbd.log)"  # reads $SLURM_CONF's folder
    started slurmdbd "$(pid_from "$WORK/run/slurmdbd.pid")"
    for ((i = 0; i < 100; i++)); do
        sacctmgr -i add cluster pacstest >/dev/null 2>&1 && break
        sleep 0.3
    done
    sacctmgr -n list cluster format=cluster | grep -q pacstest ||
        fail "slurmdbd does not answer sacctmgr (see $WORK/log/slurmdbd.log)"
fi
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (see $WORK/log/slurmctld.log)"
started slurmctld "$(pid_from "$WORK/run/slurmctld.pid")"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start (see $WORK/log/slurmd.log)"
started slurmd "$(pid_from "$WORK/run/slurmd.pid")"
for ((i = 0; i < 150; i++)); do
    [[ $(sinfo -h -N -o %T 2>/dev/null) == idle ]] && break
    sleep 0.2
done
[[ $(sinfo -h -N -o %T) == idle ]] || fail "the node is not idle: $(sinfo -N 2>&1)"
say "cluster up: $(sinfo -h -N -o '%N %c CPUs %m MB %T')"

# ------------------------------------------------------------------ helpers for the checks
# Compiled kernels in the per-user cache slurm_array.sh uses too, so only the first run
# compiles; the volume cache in the test folder.
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pacs_numba/numba}
export PACS_NUMBA_CACHE_DIR=$WORK/volumes
export PACS_LOG_LEVEL=INFO
unset OPENBLAS_NUM_THREADS OMP_NUM_THREADS MKL_NUM_THREADS PACS_NUMBA_MAX_WORKERS \
    PACS_SR_MAX_WORKERS

config_for() {  # config_for SRC NAME: a copy of SRC with its own manifest and out_root
    "$PY" - "$1" "$WORK/runs/$2" <<'PY'
import sys, yaml
src, run = sys.argv[1:]
doc = yaml.safe_load(open(src))
doc["data"]["out"] = f"{run}/manifest.json"
doc["pacs_sr"]["out_root"] = f"{run}/results"
with open(f"{run}.yaml", "w") as fh:
    yaml.safe_dump(doc, fh, sort_keys=False)
PY
    echo "$WORK/runs/$2.yaml"
}
JID=''
submit() {  # submit SBATCH_ARGS...: sbatch --parsable, job output in $WORK/out; sets JID
    JID=$(sbatch --parsable --chdir="$WORK" --output="$WORK/out/%x-%A_%a.out" "$@") ||
        fail "sbatch $* was refused"
    JID=${JID%%;*}
    JOBS+=("$JID")
    say "submitted job $JID: sbatch $*"
}
wait_job() {  # wait_job JOBID [TIMEOUT_S]: until no task of it is pending or running
    local t
    for ((t = 0; t < ${2:-900} * 2; t++)); do
        [[ -z $(squeue -h -j "$1" 2>/dev/null) ]] && return 0
        sleep 0.5
    done
    fail "job $1 still queued or running after ${2:-900} s: $(squeue -j "$1")"
}
state_of() {  # state_of JOB_TASK: "STATE EXITCODE" as slurmctld reports them
    scontrol -o show job "$1" | tr ' ' '\n' | sed -n 's/^JobState=//p; s/^ExitCode=//p' |
        paste -sd' '
}
out_of() { echo "$WORK/out/pacs-numba-$1.out"; }
same_outputs() {  # same_outputs DIR_A DIR_B [SUBDIR]: every output file byte-identical
    "$PY" - "$@" <<'PY'
import filecmp, gzip, os, sys
a, b, sub = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "")
# the run record, the per-patient timings and logs hold times and paths, not results
skip = {"patients.json", "pacs_numba_run.json"}
def files(root):
    out = set()
    for d, _, names in os.walk(os.path.join(root, sub)):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if n not in skip and "/logs/" not in f"/{rel}" and not n.endswith(".lock"):
                out.add(rel)
    return out
fa, fb = files(a), files(b)
if not fa or fa != fb:
    print(f"different file sets: only in {a}: {sorted(fa - fb)[:5]}, only in {b}: "
          f"{sorted(fb - fa)[:5]}", file=sys.stderr)
    sys.exit(1)
def same(f):
    # .gz outputs are compared by content.  On a fresh machine a resumed --workers 1 job and
    # the plain 2-worker run wrote two dominant-expert maps whose decompressed bytes were
    # identical but whose ISA-L streams differed (not reproduced in isolation: ISA-L gives no
    # byte-for-byte guarantee across writers); what a user reads is the content.  Everything
    # else is compared byte for byte.
    pa, pb = os.path.join(a, f), os.path.join(b, f)
    if f.endswith(".gz"):
        with gzip.open(pa) as x, gzip.open(pb) as y:
            return x.read() == y.read()
    return filecmp.cmp(pa, pb, shallow=False)
bad = [f for f in sorted(fa) if not same(f)]
if bad:
    print(f"{len(bad)} of {len(fa)} files differ: {bad[:5]}", file=sys.stderr)
    sys.exit(1)
print(f"{len(fa)} files identical", file=sys.stderr)
PY
}
has() { grep -qF -- "$2" "$1"; }

# ------------------------------------------------------------------ the cohorts and plain runs
say "generating cohorts and running pacs-numba train without SLURM (the reference outputs)"
"$PY" -m pacs_numba make-cohort --out "$WORK/cohort" --patients 6 --shape 40 44 36 \
    --spacings 3mm --pulses t1c t2w --kfolds 2 --patch-size 8 --stride 4 -q >/dev/null
# a larger single-pulse cohort whose task runs long enough to be cancelled in the middle
"$PY" -m pacs_numba make-cohort --out "$WORK/cohort_long" --patients 16 --shape 96 104 88 \
    --spacings 3mm --pulses t1c --kfolds 2 --patch-size 16 --stride 8 -q >/dev/null
# The plain runs use the config the jobs will use, and their results are moved aside: the
# model file records out_root, so only runs into the same folder can be byte-identical.
CFG=$(config_for "$WORK/cohort/config.yaml" array)
LONG=$(config_for "$WORK/cohort_long/config.yaml" long)
for c in "$CFG" "$LONG"; do
    "$PY" -m pacs_numba build-manifest --config "$c" -q >/dev/null
done
"$PY" -m pacs_numba train --config "$CFG" -q >"$WORK/log/plain.out" 2>&1 ||
    fail "plain train failed (see $WORK/log/plain.out)"
"$PY" -m pacs_numba train --config "$LONG" --fold 1 -q >"$WORK/log/plain_long.out" 2>&1 ||
    fail "plain train of the long cohort failed (see $WORK/log/plain_long.out)"
mv "$WORK/runs/array/results" "$WORK/runs/array/plain"
mv "$WORK/runs/long/results" "$WORK/runs/long/plain"

# ------------------------------------------------------------------ a. --list, then its line
bash "$ARRAY" --list "$CFG" >"$WORK/out/list.txt" 2>"$WORK/out/list.err" ||
    fail "slurm_array.sh --list failed: $(cat "$WORK/out/list.err")"
cat "$WORK/out/list.txt" >&2
LINE=$(sed -n 's/^submit with: //p' "$WORK/out/list.txt")
check "--list prints an sbatch line with --cpus-per-task and --mem" \
    grep -Eq -- '^sbatch --array=0-3 --cpus-per-task=[0-9]+ --mem=[0-9]+[MG] ' <<<"$LINE"
check "--list finds a node for it (no WARNING)" bash -c "! grep -q WARNING '$WORK/out/list.err'"
read -ra WORDS <<<"$LINE"  # no quoting needed: the test's paths have no spaces
submit "${WORDS[@]:1}"
sleep 1
squeue -j "$JID" >&2 || true
wait_job "$JID"
for t in 0 1 2 3; do
    check "array task ${JID}_$t completed" [ "$(state_of "${JID}_$t")" == "COMPLETED 0:0" ]
    check "task $t's summary names job ${JID}_$t" \
        grep -Eq "^summary task=$t .* exit=0 .* job=${JID}_$t " "$(out_of "${JID}_$t")"
    check "task $t's memory limit is its job's cgroup" \
        grep -Eq "memory limit [^(]+\(cgroup v1 " "$(out_of "${JID}_$t")"
done
check "the array's outputs equal the plain run's" \
    same_outputs "$WORK/runs/array/plain" "$WORK/runs/array/results"
if [[ $ACCOUNTING == 1 ]]; then
    check "sacct's MaxRSS is found by JobIDRaw and labelled as sampled" \
        grep -Eq "^peak memory: [0-9.]+ GiB exact \(max RSS of pacs-numba, getrusage\); [0-9.]+ GiB sampled \(sacct MaxRSS, job ${JID}_0 step 0\)$" \
        "$(out_of "${JID}_0")"
fi
sed -n '/^==== pacs-numba task summary/,$p' "$(out_of "${JID}_0")" >&2

# ------------------------------------------------------------------ b. a --mem too small
SMALL=$(config_for "$WORK/cohort/config.yaml" small)
submit --array=0 --cpus-per-task=1 --mem=300M "$ARRAY" "$SMALL"
JID_SMALL=$JID
wait_job "$JID_SMALL"
check "--mem=300M ends with exit 3, not an OOM kill" \
    [ "$(state_of "${JID_SMALL}_0")" == "FAILED 3:0" ]
check "its log says how much to ask for" has "$(out_of "${JID_SMALL}_0")" \
    "not even one patient fits in memory"
check "its summary says exit=3" grep -q "^summary task=0 .* exit=3 " "$(out_of "${JID_SMALL}_0")"
check "no model was written" bash -c "! find '$WORK/runs/small' -name pacs_model.npz | grep -q ."

# ------------------------------------------------------------------ c. memory per CPU
MEM_ONE=$(bash "$ARRAY" --list --cpus 1 "$CFG" 2>/dev/null | sed -n 's/^submit with: .* --mem=\([0-9]*[MG]\) .*/\1/p')
[[ -n $MEM_ONE ]] || fail "--list --cpus 1 printed no --mem"
mv "$WORK/runs/array/results" "$WORK/runs/array/results_a"  # tasks 1 and 2 again, afresh
submit --array=1 --cpus-per-task=1 --mem-per-cpu="$MEM_ONE" "$ARRAY" "$CFG"
JID_PC=$JID
SBATCH_MEM_PER_CPU=$MEM_ONE submit --array=2 --cpus-per-task=1 "$ARRAY" "$CFG"
JID_ENV=$JID
wait_job "$JID_PC"
wait_job "$JID_ENV"
check "sbatch --mem-per-cpu=$MEM_ONE is accepted and the task completes" \
    [ "$(state_of "${JID_PC}_1")" == "COMPLETED 0:0" ]
check "SBATCH_MEM_PER_CPU=$MEM_ONE reaches the job" has "$(out_of "${JID_ENV}_2")" \
    "SLURM_MEM_PER_CPU=${MEM_ONE%M}"
check "... and the task completes" [ "$(state_of "${JID_ENV}_2")" == "COMPLETED 0:0" ]
for sub in fold_1/t2w fold_2/t1c; do
    check "the outputs of $sub equal the plain run's" same_outputs "$WORK/runs/array/plain" \
        "$WORK/runs/array/results" "PaCS_SR/3mm/model_data/$sub"
done

# ------------------------------------------------------------------ d. scancel, resubmit
submit --array=0 --cpus-per-task=1 --mem=2G "$ARRAY" "$LONG" -- --workers 1
JID_L=$JID
for ((i = 0; i < 3000; i++)); do  # cancel once the first evaluated patient is written
    grep -q " split=" "$(out_of "${JID_L}_0")" 2>/dev/null && break
    sleep 0.1
done
scancel "${JID_L}_0"
say "scancel ${JID_L}_0 after: $(grep -c 'patient=' "$(out_of "${JID_L}_0")" || true) patient(s) done"
wait_job "$JID_L"
check "the cancelled task ended CANCELLED" grep -q '^CANCELLED' <<<"$(state_of "${JID_L}_0")"
check "it stopped before the end (no metrics.json yet)" \
    [ ! -e "$WORK/runs/long/results/PaCS_SR/3mm/model_data/fold_1/t1c/metrics.json" ]
submit --array=0 --cpus-per-task=1 --mem=2G "$ARRAY" "$LONG" -- --workers 1
JID_R=$JID
wait_job "$JID_R"
check "the resubmitted task completed" [ "$(state_of "${JID_R}_0")" == "COMPLETED 0:0" ]
check "it resumed (kept patients the cancelled run finished)" \
    grep -Eq "resumed \(outputs complete\)|resume: reusing the fitted model" "$(out_of "${JID_R}_0")"
check "its outputs equal the plain run's" same_outputs "$WORK/runs/long/plain" \
    "$WORK/runs/long/results"

say "PASSED: every check of the real SLURM test"
