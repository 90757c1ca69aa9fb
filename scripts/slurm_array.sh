#!/usr/bin/env bash
# pacs-numba on a SLURM array: one array task = one (fold, spacing, pulse) of a PaCS-SR config.
#
#   bash scripts/slurm_array.sh --list config.yaml             # tasks, resources, the sbatch line
#   sbatch --array=0-N --cpus-per-task=C --mem=M scripts/slurm_array.sh config.yaml   # as --list says
#   sbatch --array=0-N scripts/slurm_array.sh config.yaml -- --workers 4   # extra train flags
#   sbatch -o diagnose-%j.out scripts/slurm_array.sh --diagnose config.yaml   # see --help
#   bash scripts/slurm_array.sh --task 3 config.yaml           # one task by hand, no SLURM needed
#
# Task ids count from 0 in fold-major order: fold = id / (spacings x pulses) + 1, then spacing,
# then pulse, as `pacs-numba train` without filters runs them.  Each task trains with --resume,
# so a resubmitted task keeps the outputs that are already complete.
#
# The config comes from the first argument or $PACS_CONFIG.  sbatch passes your environment
# on: activate the environment where pacs_numba is installed before sbatch, or set
# PACS_VENV=/path/to/venv.  Other knobs (all optional):
#   PACS_NUMBA_CACHE_DIR   volume cache (default: node-local scratch, see below)
#   NUMBA_CACHE_DIR        compiled kernels (default: the package's own, as plain runs and
#                          `diagnose --warmup` use; tasks on a node compile once, under a lock)
#   PACS_NUMBA_DIAGNOSE=1  run `pacs-numba diagnose` before training (=warmup: also
#                          compile every kernel)
#   PACS_NUMBA_MAX_WORKERS cap on the patients run at once (the memory plan still applies)
#   PACS_PYTHON            the Python that has pacs_numba (default: python on PATH)
#
# Resources.  A task holds one patient per worker in memory, nothing per CPU: the width of the
# patient pool comes from the job's real memory limit (cgroup, SLURM) and the volume shape, so
# --mem is not multiplied by --cpus-per-task.  `--list` sizes a task from the cohort's real
# volume shape and expert count (the memory plan of `diagnose --json`) and prints the sbatch
# line with the --cpus-per-task and --mem it needs.  The #SBATCH lines below ask only for what
# any node can give and set no memory option, so --mem, --mem-per-cpu, SBATCH_MEM_PER_NODE or
# SBATCH_MEM_PER_CPU (or the site's default) decide the memory.
#SBATCH --job-name=pacs-numba
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
# SIGTERM 120 s before the time limit: in-flight patients finish, the task exits 143 and the
# log says how far it got; resubmit the same array id to finish it (--resume).
#SBATCH --signal=TERM@120
# stdout and stderr in one file per task (the folder must exist, so none is used here).
#SBATCH --output=%x-%A_%a.out

set -euo pipefail

T0=$SECONDS
PROG=slurm_array

log() {  # log LEVEL MESSAGE...: one line on stderr, in the format pacs-numba logs in
    printf '%s %s %s: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$1" "$PROG" "${*:2}" >&2
}
die() {  # die CODE MESSAGE...
    local code=$1
    shift
    log ERROR "$*"
    exit "$code"
}
usage() {
    cat <<EOF
usage: $0 [--list [--cpus N] | --dry-run | --diagnose] [--task ID] [CONFIG] [-- TRAIN_ARGS...]

Runs one (fold, spacing, pulse) of CONFIG (default \$PACS_CONFIG) with pacs-numba train.
The task is --task ID or \$SLURM_ARRAY_TASK_ID, counted from 0.

  --list      print the task table, what one task needs (CPUs, memory) and the sbatch line
              that runs them all, then exit; builds the manifest if needed, to read the
              volume shape.  Warns when sinfo shows no node that can take such a task.
  --cpus N    with --list: the CPUs per task to plan for (default: the patients a task
              runs at once, at most 8 and at most the largest node in sinfo)
  --dry-run   print the task, the environment and the command, run nothing
  --diagnose  build the manifest if needed, then run pacs-numba diagnose
              --config CONFIG --warmup (checks the node, compiles the kernels); no training
  --task ID   the task to run (overrides \$SLURM_ARRAY_TASK_ID)
  -- ARGS     passed on to pacs-numba train (e.g. -- --workers 4 --mem-budget 12G)
EOF
}

# ------------------------------------------------------------------ arguments
MODE=run
TASK_ID=${SLURM_ARRAY_TASK_ID:-}
TASK_SOURCE=SLURM_ARRAY_TASK_ID
CONFIG=${PACS_CONFIG:-}
LIST_CPUS=''
EXTRA=()
while (($#)); do
    case $1 in
        --list) MODE=list ;;
        --cpus)
            (($# >= 2)) || die 2 "--cpus needs a CPU count"
            LIST_CPUS=$2
            shift
            ;;
        --cpus=*) LIST_CPUS=${1#--cpus=} ;;
        --dry-run) MODE=dry-run ;;
        --diagnose) MODE=diagnose ;;
        --task)
            (($# >= 2)) || die 2 "--task needs a task id"
            TASK_ID=$2 TASK_SOURCE=--task
            shift
            ;;
        --task=*) TASK_ID=${1#--task=} TASK_SOURCE=--task ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) usage >&2; die 2 "unknown option $1 (train flags go after --)" ;;
        *) CONFIG=$1 ;;
    esac
    shift
done
[[ -n $CONFIG ]] || { usage >&2; die 2 "no config: pass CONFIG or set PACS_CONFIG"; }
[[ -f $CONFIG ]] || die 2 "config '$CONFIG' does not exist (working directory $PWD)"
if [[ -n $LIST_CPUS ]]; then
    [[ $MODE == list ]] || die 2 "--cpus goes with --list (to sbatch, pass --cpus-per-task)"
    [[ $LIST_CPUS =~ ^[1-9][0-9]*$ ]] || die 2 "--cpus $LIST_CPUS is not a CPU count >= 1"
fi
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")

# ------------------------------------------------------------------ Python and pacs-numba
if [[ -n ${PACS_VENV:-} ]]; then
    [[ -f $PACS_VENV/bin/activate ]] || die 2 "PACS_VENV=$PACS_VENV has no bin/activate"
    set +u  # some activate scripts read unset variables
    # shellcheck disable=SC1091
    . "$PACS_VENV/bin/activate"
    set -u
fi
PY=${PACS_PYTHON:-$(command -v python || command -v python3 || true)}
[[ -n $PY ]] || die 2 "no python on PATH: activate the environment that has pacs_numba or set PACS_PYTHON"
if [[ -z ${PACS_PYTHON:-} ]] && command -v pacs-numba >/dev/null 2>&1; then
    PACS=(pacs-numba)
else
    PACS=("$PY" -m pacs_numba)
fi
# pacs_numba's node check and memory plan, through the same entry point as train: the one
# place that says how diagnose is run
DIAGNOSE=("${PACS[@]}" diagnose)

# ------------------------------------------------------------------ the task table
# Spacings, pulses and the fold count come from the config (and the manifest once it exists:
# it is what train reads), through pacs_numba's own config loader.
read_tasks() {
    "$PY" - "$CONFIG" <<'PY'
import os, shlex, sys, warnings

warnings.simplefilter("ignore")  # unknown-key warnings: pacs-numba train prints them once
try:
    from pacs_numba.config import load_config
    from pacs_numba.errors import PacsError
    from pacs_numba.store.manifest import load_manifest
except ImportError as exc:
    sys.exit(f"cannot import pacs_numba with {sys.executable} ({exc}): activate the "
             "environment where it is installed before sbatch, or set PACS_VENV or PACS_PYTHON")
try:
    cfg = load_config(sys.argv[1])
    manifest = os.path.abspath(cfg.data.out)
    if os.path.isfile(manifest):
        n_folds, source = len(load_manifest(manifest)["folds"]), f"the manifest {manifest}"
    else:
        n_folds, source = cfg.data.kfolds, f"data.kfolds; the manifest {manifest} is not built yet"
except PacsError as exc:
    sys.exit(str(exc))
q = shlex.quote
print(f"NFOLDS={n_folds}")
print(f"FOLDS_SOURCE={q(source)}")
print(f"MANIFEST={q(manifest)}")
print("SPACINGS=(" + " ".join(q(s) for s in cfg.data.spacings) + ")")
print("PULSES=(" + " ".join(q(p) for p in cfg.data.pulses) + ")")
print(f"NUM_WORKERS={q(str(cfg.pacs_sr.num_workers or ''))}")
PY
}
load_table() {
    local table
    table=$(read_tasks) || die 2 "cannot read the tasks of $CONFIG (see above)"
    NFOLDS=0 FOLDS_SOURCE='' MANIFEST='' SPACINGS=() PULSES=() NUM_WORKERS=''
    eval "$table"
    NS=${#SPACINGS[@]}
    NP=${#PULSES[@]}
    NTASKS=$((NFOLDS * NS * NP))
    LAST=$((NTASKS - 1))
    SHAPE="$NFOLDS folds x $NS spacings (${SPACINGS[*]}) x $NP pulses (${PULSES[*]}) = $NTASKS tasks"
}
load_table

task_of() {  # task_of ID: sets FOLD SPACING PULSE (fold-major, like pacs-numba train)
    local id=$1
    FOLD=$((id / (NS * NP) + 1))
    SPACING=${SPACINGS[$(((id / NP) % NS))]}
    PULSE=${PULSES[$((id % NP))]}
}

# ------------------------------------------------------------------ threads and caches
# Numba runs the kernels on every CPU of the task; the engine splits them between the
# patients it runs at once (numba threads per patient = CPUs / pool width).  BLAS stays
# single-threaded so it never competes with Numba for the same cores.  OMP_NUM_THREADS follows
# the CPUs too: a value of 1 left in the login shell by the published workflow must not leak in.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    CPUS=$SLURM_CPUS_PER_TASK CPUS_SOURCE=SLURM_CPUS_PER_TASK
else  # nproc honours the affinity mask but also OMP_NUM_THREADS, hence the env -u
    CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUS_SOURCE=nproc
fi
export NUMBA_NUM_THREADS=$CPUS OMP_NUM_THREADS=$CPUS
export OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1
export PYTHONUNBUFFERED=1
# Compiled kernels: the package's own place (its kernels' __pycache__, or for a read-only
# install ${XDG_CACHE_HOME:-~/.cache}/pacs_numba/numba), the one `diagnose --warmup` fills.

# Volume cache: decompressed volumes, shared by every task of this user on the node (one
# folder per user, not per job, so array tasks that land on the same node share it).
USER_TAG=${USER:-$(id -un 2>/dev/null || id -u)}
USER_TAG=${USER_TAG//[^A-Za-z0-9._-]/_}
choose_cache_dir() {
    if [[ -n ${PACS_NUMBA_CACHE_DIR:-} ]]; then
        CACHE_SOURCE=PACS_NUMBA_CACHE_DIR
        return
    fi
    local root dir
    for root in "${SLURM_TMPDIR:-}" "${TMPDIR:-}" "/scratch/$USER_TAG" "/local/$USER_TAG"; do
        [[ -n $root && -d $root && -w $root ]] || continue
        dir=$root/pacs_numba-$USER_TAG/volumes
        if (umask 077 && mkdir -p "$dir") 2>/dev/null && [[ -w $dir ]]; then
            export PACS_NUMBA_CACHE_DIR=$dir
            CACHE_SOURCE="node-local scratch $root"
            return
        fi
    done
    CACHE_SOURCE="pacs-numba's default (no writable scratch found)"
}
CACHE_SOURCE=''
choose_cache_dir

# ------------------------------------------------------------------ the command
SRUN=()
if [[ -n ${SLURM_JOB_ID:-} ]] && command -v srun >/dev/null 2>&1; then
    SRUN=(srun --nodes=1 --ntasks=1)
    # srun no longer inherits --cpus-per-task from sbatch (SLURM >= 22.05): pass it on.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        SRUN+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    fi
fi

# The run goes through a small Python parent that records pacs-numba's peak RSS
# (getrusage of its child) and the SLURM step id for the summary.  It forwards SIGTERM and
# leaves SIGINT to the process group, so pacs-numba stops the way it does when run directly.
# (GNU time would die on SIGTERM and let the step end under a still-running pacs-numba.)
MEASURE=$(cat <<'PY'
import os, resource, signal, subprocess, sys
out, cmd = sys.argv[1], sys.argv[2:]
child = None
def forward(signum, frame):
    if child is not None and child.poll() is None:
        child.send_signal(signum)
signal.signal(signal.SIGTERM, forward)
try:
    child = subprocess.Popen(cmd)
except OSError as exc:
    print(f"cannot run {cmd[0]}: {exc}", file=sys.stderr)
    sys.exit(127)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to the child as well
rc = child.wait()
with open(out, "w") as fh:
    fh.write(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} "
             f"{os.environ.get('SLURM_STEP_ID', '')}\n")
sys.exit(128 - rc if rc < 0 else rc)
PY
)
describe_env() {
    log INFO "threads: NUMBA_NUM_THREADS=$NUMBA_NUM_THREADS OMP_NUM_THREADS=$OMP_NUM_THREADS" \
        "(from $CPUS_SOURCE), OPENBLAS/MKL/NUMEXPR 1"
    log INFO "compiled kernels: NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-(numba default)}"
    log INFO "volume cache: PACS_NUMBA_CACHE_DIR=${PACS_NUMBA_CACHE_DIR:-(default)} ($CACHE_SOURCE)"
    local over='' name
    for name in PACS_NUMBA_MAX_WORKERS PACS_SR_MAX_WORKERS; do
        if [[ -n ${!name:-} ]]; then over+=" $name=${!name}"; fi
    done
    if [[ -n $over ]]; then log INFO "worker overrides:$over"; fi
}

# ------------------------------------------------------------------ manifest, once
# The first task to get the lock builds it; the others wait, then find it built.  The write
# is atomic and the build deterministic, so even without working locks (some network file
# systems) concurrent builds would only write the same file twice.
ensure_manifest() {
    if [[ -f $MANIFEST ]]; then
        log INFO "manifest $MANIFEST exists; using it"
        return 0
    fi
    mkdir -p "$(dirname "$MANIFEST")"
    local lock=$MANIFEST.lock lrc=0 brc=0
    log INFO "manifest $MANIFEST not built yet; taking the lock $lock"
    if command -v flock >/dev/null 2>&1 && { exec 9>>"$lock"; } 2>/dev/null; then
        flock -E 75 -w "${PACS_NUMBA_LOCK_TIMEOUT:-1800}" 9 || lrc=$?
        if ((lrc == 75)); then
            die 1 "timed out after ${PACS_NUMBA_LOCK_TIMEOUT:-1800} s waiting for $lock:" \
                "another task has held it that long (a stuck manifest build?)"
        elif ((lrc > 128)); then
            die "$lrc" "stopped by signal $((lrc - 128)) while waiting for the manifest lock"
        elif ((lrc != 0)); then
            log WARNING "cannot lock $lock (a file system without locks?); building without it"
        fi
    else
        log WARNING "cannot lock $lock (no flock, or not writable); building without a lock"
    fi
    if [[ -f $MANIFEST ]]; then
        log INFO "manifest $MANIFEST was built by another task while this one waited; using it"
    else
        log INFO "building manifest $MANIFEST"
        "${PACS[@]}" build-manifest --config "$CONFIG" >&2 || brc=$?
        ((brc == 0)) || die "$brc" "building the manifest failed (exit $brc)"
        log INFO "manifest built"
    fi
    exec 9>&-  # releases the lock
}

# ------------------------------------------------------------------ --list: tasks and resources
# Every memory figure comes from pacs_numba's own planner (`diagnose --json`): the volume shape
# of the manifest's first HR, the expert count, and per stage the memory a task needs at each
# width with the --mem to ask for (its "by_width").  This script only picks the width the task
# will run at on the CPUs it asks for (not this login node's limits) and reads those figures.
PLAN_RESOURCES=$(cat <<'PY'
import json, os, shlex, shutil, subprocess, sys, time

from pacs_numba.resources.units import human_size, parse_size

plan_file, script, config, last, cpus_arg, num_workers, *extra = sys.argv[1:]


def warn(msg):  # in the script's log format
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING slurm_array: {msg}", file=sys.stderr)


def option(args, name):
    """Value of the last `name V` / `name=V` in args, or None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def sinfo_nodes():
    """[(node, cpus, memory MiB)] from sinfo, or None when it cannot be asked."""
    if shutil.which("sinfo") is None:
        return None
    try:
        res = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %c %m"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    nodes = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].rstrip("+").isdigit():
            nodes.append((parts[0], int(parts[1]), int(parts[2].rstrip("+"))))
    return nodes


doc = None
try:
    with open(plan_file) as fh:
        doc = json.load(fh)
    plan = doc["plan"]
    stages = plan["stages"]
    shape = "x".join(str(int(n)) for n in plan["shape"])
    n_experts = int(plan["n_experts"])
    names = [name for name in ("fit", "evaluate") if name in stages]  # a stage may be absent
    if not names:
        raise KeyError("no fit or evaluate stage")
    for name in names:
        st = stages[name]
        int(st["n_patients"]), int(st["per_patient_bytes"])
        for row in st["by_width"]:
            int(row["width"]), int(row["needed_bytes"]), parse_size(row["sbatch_mem"])
except (OSError, ValueError, KeyError, TypeError) as exc:
    problems = ""
    if isinstance(doc, dict):
        problems = "; ".join(c.get("message", "") for c in doc.get("checks", [])
                             if c.get("level") == "fail")
    warn(f"cannot size a task: diagnose --json gave no usable memory plan ({exc!r}"
         f"{'; ' + problems if problems else ''}); add --mem yourself "
         f"(run the --diagnose mode inside an allocation to see what one patient needs)")
    cpus = int(cpus_arg or 2)
    print(f"submit with: sbatch --array=0-{last} --cpus-per-task={cpus} "
          + " ".join(shlex.quote(a) for a in (script, config, *(["--", *extra] if extra else []))))
    sys.exit(0)

nodes = sinfo_nodes()
most = max((n for _, n, _ in nodes), default=None) if nodes else None
def count(value, what):
    """A worker count >= 1, or None (with a warning: pacs-numba train will refuse it)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        warn(f"{what}={value!r} is not a worker count >= 1; planning without it")
        return None
    return n


workers = option(extra, "--workers")
request = None  # the width asked for, as pacs-numba train reads it
if workers is not None:
    request = workers = count(workers, "--workers")
if workers is None:
    for name in ("PACS_NUMBA_MAX_WORKERS", "PACS_SR_MAX_WORKERS"):
        if os.environ.get(name, "").strip():
            request = count(os.environ[name], name)
            break
    if num_workers and int(num_workers) > 0:
        request = min(request or int(num_workers), int(num_workers))
widest = max(int(stages[name]["n_patients"]) for name in names)
if cpus_arg:
    cpus, why = int(cpus_arg), "--cpus"
else:
    cpus, why = max(1, min(8, widest, request or widest)), "patients at once, at most 8"
    if most is not None and most < cpus:
        cpus, why = most, f"the largest node in sinfo has {most}"

rows, top = [], None
for name in names:
    st = stages[name]
    n = max(1, int(st["n_patients"]))
    width = min(cpus, n)
    if request is not None:
        width = min(width, request)
    if num_workers and int(num_workers) < 0 and workers is None:
        width = min(width, max(1, cpus + 1 + int(num_workers)))
    by_width = {int(r["width"]): r for r in st["by_width"]}
    row = by_width[min(width, max(by_width))]
    need = int(row["needed_bytes"])
    if top is None or need > int(top["needed_bytes"]):
        top = row
    rows.append(f"  {name:9s} {int(st['n_patients']):3d} patients, {width} at once x "
                f"{max(1, cpus // width)} numba thread(s): needs {human_size(need)} "
                f"({human_size(int(st['per_patient_bytes']))} per patient)")
mem = top["sbatch_mem"]
mem_mib = parse_size(mem) >> 20
print(f"one task: volumes {shape}, {n_experts} experts, {cpus} CPU(s) ({why})")
print("\n".join(rows))
need = int(top["needed_bytes"])
headroom = parse_size(mem) - need
print(f"--mem={mem}: {human_size(headroom)} ({100 * headroom / need:.0f}%) over the planner's "
      f"need of {human_size(need)}, for the baseline each task measures itself and SLURM's "
      "rounding (pacs-numba diagnose --config C shows the same planner figures)")
line = ["sbatch", f"--array=0-{last}", f"--cpus-per-task={cpus}", f"--mem={mem}", script,
        config, *(["--", *extra] if extra else [])]
print("submit with: " + " ".join(shlex.quote(a) for a in line))
if nodes is None:
    print("(sinfo not available here: cannot check that a node can take such a task)")
elif not any(c >= cpus and m >= mem_mib for _, c, m in nodes):
    biggest = ", ".join(sorted({f"{c} CPUs {m}M" for _, c, m in nodes})) or "none"
    warn(f"no node in sinfo can take --cpus-per-task={cpus} --mem={mem} (nodes: {biggest}); "
         "such a job would stay pending: ask for fewer CPUs (--cpus N; memory is per patient "
         "at once, not per CPU) or use smaller volumes or fewer experts")
PY
)

if [[ $MODE == list ]]; then
    if [[ ! -f $MANIFEST ]]; then  # the volume shape and the fold count come from it
        ensure_manifest
        load_table
    fi
    echo "$CONFIG: $SHAPE (fold count from $FOLDS_SOURCE)"
    printf '%6s %5s  %-10s %s\n' task fold spacing pulse
    for ((i = 0; i < NTASKS; i++)); do
        task_of "$i"
        printf '%6d %5d  %-10s %s\n' "$i" "$FOLD" "$SPACING" "$PULSE"
    done
    plan_json=$(mktemp "${TMPDIR:-/tmp}/pacs_numba_plan.XXXXXX")
    DIAG=("${DIAGNOSE[@]}" --config "$CONFIG" --json)
    workers=''
    for ((i = 0; i < ${#EXTRA[@]}; i++)); do  # --workers of the train args sizes the plan too
        case ${EXTRA[i]} in
            --workers) workers=${EXTRA[i + 1]:-} ;;
            --workers=*) workers=${EXTRA[i]#--workers=} ;;
        esac
    done
    if [[ -n $workers ]]; then DIAG+=(--workers "$workers"); fi
    # diagnose plans on this node's limits: with --cpus, no more CPUs than the task will have
    if [[ -n $LIST_CPUS ]]; then export SLURM_CPUS_PER_TASK=$LIST_CPUS; fi
    "${DIAG[@]}" >"$plan_json" || true  # a failed check still prints JSON; judged below
    rc=0
    "$PY" -c "$PLAN_RESOURCES" "$plan_json" "$0" "$CONFIG" "$LAST" "$LIST_CPUS" \
        "$NUM_WORKERS" "${EXTRA[@]}" || rc=$?
    rm -f "$plan_json"
    exit "$rc"
fi

if [[ $MODE == diagnose ]]; then  # the manifest too, so that diagnose can size a patient
    describe_env
    ensure_manifest
    log INFO "running: ${SRUN[*]}${SRUN[*]:+ }${DIAGNOSE[*]} --config $CONFIG --warmup"
    rc=0
    "${SRUN[@]}" "${DIAGNOSE[@]}" --config "$CONFIG" --warmup || rc=$?
    exit "$rc"
fi

# ------------------------------------------------------------------ which task
[[ -n $TASK_ID ]] || die 2 "no task id: submit with sbatch --array=0-$LAST, or pass --task ID" \
    "(--list shows the table)"
[[ $TASK_ID =~ ^[0-9]+$ ]] || die 2 "$TASK_SOURCE=$TASK_ID is not a task id: $CONFIG has ids 0-$LAST" \
    "(--array=0-$LAST)"
TASK_ID=$((10#$TASK_ID))
if ((TASK_ID > LAST)); then
    die 2 "$TASK_SOURCE=$TASK_ID is out of range: $CONFIG has $SHAPE, ids 0-$LAST" \
        "(they count from 0, not 1 as in the published array script); submit with --array=0-$LAST"
fi
# The job as SLURM shows it: ARRAYJOB_TASK (5_0) for an array task, else the job id.
if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    JOB_NAME=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
else
    JOB_NAME=${SLURM_JOB_ID:-none}
fi

task_of "$TASK_ID"
CMD=("${PACS[@]}" train --config "$CONFIG" --fold "$FOLD" --spacing "$SPACING" --pulse "$PULSE"
    --resume --no-progress "${EXTRA[@]}")

log INFO "task $TASK_ID of 0-$LAST: fold=$FOLD spacing=$SPACING pulse=$PULSE" \
    "($SHAPE, fold-major; job $JOB_NAME, host ${HOSTNAME:-$(uname -n)})"
describe_env
if [[ $MODE == dry-run ]]; then
    echo "task=$TASK_ID fold=$FOLD spacing=$SPACING pulse=$PULSE"
    echo "NUMBA_NUM_THREADS=$NUMBA_NUM_THREADS OMP_NUM_THREADS=$OMP_NUM_THREADS"
    echo "NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-}"
    echo "PACS_NUMBA_CACHE_DIR=${PACS_NUMBA_CACHE_DIR:-}"
    echo "manifest: $MANIFEST"
    echo "command: ${SRUN[*]}${SRUN[*]:+ }${CMD[*]}"
    exit 0
fi

# ------------------------------------------------------------------ summary (always printed)
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pacs_numba_slurm.XXXXXX")
MAXRSS_FILE=$RUN_DIR/maxrss
RC=0 STAGE=start T_TRAIN=''
SIGNALLED=''
trap 'SIGNALLED=TERM' TERM  # keep the shell alive until pacs-numba has stopped, then summarise
trap 'SIGNALLED=INT' INT

explain_rc() {
    case $1 in
        0) echo "success" ;;
        1) echo "unexpected error: a bug, the traceback is in the log" ;;
        2) echo "usage, config or input error: see the ERROR line above" ;;
        3) echo "memory budget: not even one patient fits, see the ERROR line (raise --mem)" ;;
        130) echo "interrupted (SIGINT)" ;;
        137) echo "killed by SIGKILL: out of memory (OOM killer), or still running past the" \
            "time limit's grace period" ;;
        143) echo "stopped by SIGTERM (time limit or scancel); resubmit this id to finish it" ;;
        *) if (($1 > 128)); then echo "killed by signal $(($1 - 128))"; else echo "failed"; fi ;;
    esac
}

gib() { awk -v b="$1" 'BEGIN { printf "%.2f GiB", b / 1073741824 }'; }

# Largest MaxRSS, in bytes, of this job's steps in sacct (of step $1 when known).  Rows are
# matched on JobIDRaw: SLURM_JOB_ID is the raw id, and sacct prints an array task's steps
# as ARRAYJOB_TASK.STEP (5_0.0) in JobID but as JOBID.STEP (6.0) in JobIDRaw.
sacct_peak() {
    local step=$1 out tries
    for tries in 1 2 3; do
        out=$(sacct -j "$SLURM_JOB_ID" --noheader --parsable2 --format=JobIDRaw,MaxRSS \
            2>/dev/null) || return 1
        out=$(awk -F'|' -v want="${step:+$SLURM_JOB_ID.$step}" '
            function bytes(v,   n, u) {
                n = v + 0; u = toupper(substr(v, length(v)))
                if (u == "K") n *= 1024; else if (u == "M") n *= 1048576
                else if (u == "G") n *= 1073741824; else if (u == "T") n *= 1099511627776
                return n
            }
            (want == "" || $1 == want) && $2 != "" { b = bytes($2); if (b > max) max = b }
            END { if (max > 0) printf "%.0f\n", max }' <<<"$out")
        if [[ -n $out ]]; then
            echo "$out"
            return 0
        fi
        if ((tries < 3)); then sleep 2; fi  # accounting can lag the end of a step a little
    done
    return 1
}

cgroup_peak() {  # peak memory of this shell's cgroup (the batch step's), bytes
    "$PY" - <<'PY' 2>/dev/null
from pacs_numba.resources.limits import cgroup_memory_usage
u = cgroup_memory_usage()
if u is not None and u.peak_bytes:
    print(u.peak_bytes, u.source)
PY
}

summary() {
    local rc=$RC wall=$((SECONDS - T0)) peak='' maxrss_kib='' step='' b cg sacct_b=''
    set +e  # a summary is always printed; the traps above keep a second SIGTERM from cutting it
    if [[ -s $MAXRSS_FILE ]]; then
        read -r maxrss_kib step <"$MAXRSS_FILE"
    fi
    if [[ -n ${SLURM_JOB_ID:-} ]] && command -v sacct >/dev/null 2>&1 && [[ $STAGE == train ]]; then
        if b=$(sacct_peak "$step"); then sacct_b=$b; fi
    fi
    # The exact figure first: the kernel's high-water mark of pacs-numba's RSS (getrusage).
    # sacct's MaxRSS is sampled every JobAcctGatherFrequency seconds and misses short peaks.
    if [[ -n $maxrss_kib ]]; then
        peak="$(gib $((maxrss_kib * 1024))) exact (max RSS of pacs-numba, getrusage)"
        PEAK_B=$((maxrss_kib * 1024)) PEAK_SRC=maxrss
    fi
    if [[ -n $sacct_b ]]; then
        local what
        what="$(gib "$sacct_b") sampled (sacct MaxRSS, job $JOB_NAME${step:+ step $step})"
        if [[ -n $peak ]]; then
            peak+="; $what"
        else
            peak=$what PEAK_B=$sacct_b PEAK_SRC=sacct
        fi
    fi
    # last resort, and only where pacs-numba ran in this shell's cgroup: the batch step
    if [[ -z $peak && $STAGE == train && -n ${SLURM_JOB_ID:-} && ${#SRUN[@]} == 0 ]] &&
        cg=$(cgroup_peak) && [[ -n $cg ]]; then
        peak="$(gib "${cg%% *}") (${cg#* } peak)"
        PEAK_B=${cg%% *} PEAK_SRC=cgroup
    fi
    echo "==== pacs-numba task summary ===="
    echo "task:        $TASK_ID of 0-$LAST: fold $FOLD, spacing $SPACING, pulse $PULSE ($CONFIG)"
    local during='' train=''
    if [[ $STAGE != train ]]; then during=" (in the $STAGE stage, before training)"; fi
    if [[ -n $T_TRAIN ]]; then train=", of which train ${T_TRAIN} s"; fi
    echo "exit code:   $rc, $(explain_rc "$rc")$during${SIGNALLED:+; this script got SIG$SIGNALLED}"
    echo "wall time:   ${wall} s ($(printf '%dh%02dm%02ds' $((wall / 3600)) $((wall % 3600 / 60)) \
        $((wall % 60))))$train"
    echo "peak memory: ${peak:-unknown (no sacct, no measurement, no cgroup figure)}"
    echo "summary task=$TASK_ID fold=$FOLD spacing=$SPACING pulse=$PULSE exit=$rc wall_s=$wall" \
        "train_s=${T_TRAIN:-NA} peak_mem_gib=$([[ -n ${PEAK_B:-} ]] &&
            awk -v b="$PEAK_B" 'BEGIN { printf "%.3f", b / 1073741824 }' || echo NA)" \
        "peak_source=${PEAK_SRC:-none} sacct_maxrss_gib=$([[ -n $sacct_b ]] &&
            awk -v b="$sacct_b" 'BEGIN { printf "%.3f", b / 1073741824 }' || echo NA)" \
        "job=$JOB_NAME host=${HOSTNAME:-$(uname -n)}"
    rm -rf "$RUN_DIR"
}
on_exit() {
    local rc=$?
    if [[ $RC == 0 ]]; then RC=$rc; fi
    summary
    exit "$RC"
}
trap on_exit EXIT

STAGE=manifest
ensure_manifest

# ------------------------------------------------------------------ optional diagnose
case ${PACS_NUMBA_DIAGNOSE:-0} in
    0 | '') ;;
    *)
        STAGE=diagnose
        DIAG=("${DIAGNOSE[@]}" --config "$CONFIG")
        if [[ $PACS_NUMBA_DIAGNOSE == warmup ]]; then DIAG+=(--warmup); fi
        log INFO "running: ${DIAG[*]}"
        # a failed check is reported, not fatal: train gives the authoritative error
        "${DIAG[@]}" >&2 || log WARNING "diagnose reported a failed check (see above); training anyway"
        ;;
esac

# ------------------------------------------------------------------ train
STAGE=train
log INFO "running: ${SRUN[*]}${SRUN[*]:+ }${CMD[*]} (under a peak-RSS recorder)"
t=$SECONDS
"${SRUN[@]}" "$PY" -c "$MEASURE" "$MAXRSS_FILE" "${CMD[@]}" || RC=$?
T_TRAIN=$((SECONDS - t))
exit "$RC"
