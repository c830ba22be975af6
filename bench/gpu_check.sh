#!/usr/bin/env bash
# The one-call GPU check: install, record the machine, run the GPU tests, measure the ceilings,
# run the benchmark suite and the memory check, and write everything into OUTDIR.
#
#   bench/gpu_check.sh OUTDIR
#
# For a GPU machine with torch and triton installed and no network; at most 8 minutes on an
# H200 (each stage has its own timeout, and the Python stages stop themselves earlier through
# --time-budget so that what they measured is written). A failing stage does not stop the
# others. OUTDIR gets at most 8 flat files: env.txt, tests.log, ceilings.csv, throughput.csv,
# throughput.png, memory.csv, memory.png, summary.md.
#
# Exit status: 0 when every stage passed, 1 when one failed or timed out, 2 on a usage error.
#
# Environment:
#   NCA_FAST_GPU_CHECK_DRY=1       skip install and every CUDA stage; write env.txt and
#                                  summary.md only (checks this script on a machine with no GPU)
#   NCA_FAST_GPU_CHECK_REHEARSE=1  run every stage on the CPU at tiny sizes (a dress rehearsal
#                                  of the whole script; minutes on a 2-core machine)
#   NCA_FAST_GPU_CHECK_TESTS=...   pytest targets of the tests stage (default: tests)
#   NCA_FAST_GPU_CHECK_TESTS_S=N   the tests stage's limit in seconds (default 140)
#   NCA_FAST_GPU_CHECK_SECONDS=N   the whole run's limit (default 470)
#   PYTHON=...                     the interpreter (default: python)
set -u

usage() {
    echo "usage: bench/gpu_check.sh OUTDIR   (see the header of this script)" >&2
}

if [ $# -ne 1 ] || [ -z "${1:-}" ]; then
    usage
    exit 2
fi
OUT=$1
if ! mkdir -p -- "$OUT" 2>/dev/null || [ ! -d "$OUT" ]; then
    echo "gpu_check: error: cannot create the folder OUTDIR=$OUT" >&2
    exit 2
fi
# A probe file rather than test -w: root passes -w on any folder, even a read-only mount.
probe="$OUT/.gpu_check_probe.$$"
if ! ( : >"$probe" ) 2>/dev/null; then
    echo "gpu_check: error: OUTDIR=$OUT is not writable" >&2
    exit 2
fi
rm -f -- "$probe"
OUT=$(cd -- "$OUT" && pwd)
ROOT=$(cd -- "$(dirname -- "$0")/.." && pwd)
cd -- "$ROOT" || exit 2

PY=${PYTHON:-python}
DRY=${NCA_FAST_GPU_CHECK_DRY:-0}
REHEARSE=${NCA_FAST_GPU_CHECK_REHEARSE:-0}
TESTS=${NCA_FAST_GPU_CHECK_TESTS:-tests}
WORK=$(mktemp -d)
trap 'rm -rf -- "$WORK"' EXIT
STAGES="$WORK/stages.md"
FAILED=0
START=$(date +%s)
# Every stage's limit is cut to what is left of 470 s, so the whole run stays under 8 minutes.
DEADLINE=$(( START + ${NCA_FAST_GPU_CHECK_SECONDS:-470} ))
if [ "$DRY" = 1 ]; then MODE="dry run (no CUDA stage)"
elif [ "$REHEARSE" = 1 ]; then MODE="rehearsal on the CPU (tiny sizes; not GPU figures)"
else MODE="GPU"; fi
: >"$STAGES"

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }

# stage NAME LIMIT_S LOGFILE CMD... : run CMD under timeout, record PASS / FAIL / TIMEOUT.
stage() {
    local name=$1 limit=$2 logfile=$3 t0 rc dt status left
    shift 3
    t0=$(date +%s)
    left=$(( DEADLINE - t0 - 12 ))
    if [ "$left" -lt 5 ]; then
        printf '| %s | NOT RUN: no time left of the 8 minutes | - |\n' "$name" >>"$STAGES"
        log "$name: not run, no time left"
        FAILED=1
        return 1
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    log "$name: starting (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" >"$logfile" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) status=PASS ;;
        124|137) status="TIMEOUT (limit ${limit} s)"; FAILED=1 ;;
        *) status="FAIL (exit $rc)"; FAILED=1 ;;
    esac
    printf '| %s | %s | %d s |\n' "$name" "$status" "$dt" >>"$STAGES"
    log "$name: $status in ${dt} s"
    return $rc
}

skip() { printf '| %s | skipped: %s | - |\n' "$1" "$2" >>"$STAGES"; }

# ------------------------------------------------------------------------------ install
INSTALL="editable install (pip install -e .)"
if [ "$DRY" = 1 ] || [ "$REHEARSE" = 1 ]; then
    skip install "$MODE: uses the interpreter's current nca_fast"
    INSTALL="not attempted ($MODE)"
else
    if ! stage install 60 "$WORK/install.log" \
            "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
        INSTALL="pip install -e . FAILED (log in summary.md)"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# nca_fast.kernels is kernels/ (setup.py's package_dir), importable through the editable
# install. Without it nothing below can run: every check stage is recorded as not run and the
# script fails (a dry run imports nothing but what env.txt reports).
IMPORTABLE=1
if [ "$DRY" != 1 ] && ! timeout 60 "$PY" -c "import nca_fast.kernels" >"$WORK/import.log" 2>&1; then
    IMPORTABLE=0
    FAILED=1
    INSTALL="$INSTALL; nca_fast.kernels NOT importable: $(tail -n 1 "$WORK/import.log")"
    log "error: nca_fast.kernels cannot be imported with $PY: $(tail -n 1 "$WORK/import.log")"
fi

# ------------------------------------------------------------------------------ env
{
    echo "mode: $MODE"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted files: $(git status --porcelain 2>/dev/null | wc -l)"
    echo "install: $INSTALL"
    echo "host: $(hostname 2>/dev/null || echo unknown)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
    echo "cpus: $(nproc 2>/dev/null || echo unknown)"
    timeout 30 "$PY" - <<'PYEOF' 2>&1
import platform, sys
print("python:", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch:", torch.__version__, "| cuda runtime:", torch.version.cuda,
          "| cudnn:", torch.backends.cudnn.version())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                  f"{p.multi_processor_count} SMs")
    else:
        print("cuda: not available to torch")
except Exception as e:
    print("torch: import failed:", e)
try:
    import triton
    print("triton:", triton.__version__)
except Exception as e:
    print("triton: import failed:", e)
try:
    import nca_fast
    print("nca_fast:", nca_fast.__version__, "from", nca_fast.__file__)
except Exception as e:
    print("nca_fast: import failed:", e)
PYEOF
    echo "--- nvidia-smi --query-gpu ---"
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv 2>&1 || echo "nvidia-smi: not available"
    echo "--- nvidia-smi ---"
    timeout 10 nvidia-smi 2>&1 || echo "nvidia-smi: not available"
} >"$OUT/env.txt"
printf '| env | PASS | - |\n' >>"$STAGES"

# ------------------------------------------------------------------------------ the checks
if [ "$DRY" = 1 ]; then
    for s in tests ceilings suite memory; do skip "$s" "$MODE"; done
elif [ "$IMPORTABLE" = 0 ]; then
    for s in tests ceilings suite memory; do
        printf '| %s | NOT RUN: nca_fast.kernels is not importable (see install) | - |\n' "$s" \
            >>"$STAGES"
    done
else
    if [ "$REHEARSE" = 1 ]; then
        DEV=cpu
        CEIL_ARGS=(--matmul-size 256 --copy-bytes 4194304)
        SUITE_ARGS=(--sizes 1x8x8@1 --repeats 1 --threads 1 --time-budget 60
                    --providers nca_fast-triton,nca_fast-torch,torch-eager)
        MEM_ARGS=(--quick --repeats 1 --threads 1 --providers nca_fast-torch,torch-eager)
    else
        DEV=cuda
        CEIL_ARGS=()
        # torch.compile compiles anew for every shape (tens of seconds each): the article's
        # configuration shows it; the larger grids are left to the kernels and eager.
        SUITE_ARGS=(--time-budget 120 --exclude
                    "torch-compile@1x1024x1024,torch-compile@1x4096x4096,torch-compile@1x16384x16384,torch-compile@1x256x256")
        MEM_ARGS=(--memcheck --time-budget 55)
    fi
    # Tests choose their GPU tolerances themselves when CUDA is visible.
    stage tests "${NCA_FAST_GPU_CHECK_TESTS_S:-140}" "$OUT/tests.log" \
        "$PY" -m pytest -q $TESTS -m "not slow" -p no:cacheprovider -rfE
    if [ "$(wc -c <"$OUT/tests.log")" -gt 8000000 ]; then
        tail -c 8000000 "$OUT/tests.log" >"$WORK/tests.tail" && mv "$WORK/tests.tail" "$OUT/tests.log"
    fi
    stage ceilings 30 "$WORK/ceilings.log" \
        "$PY" -m bench.ceilings --device "$DEV" --out "$OUT/ceilings.csv" ${CEIL_ARGS[@]+"${CEIL_ARGS[@]}"}
    stage suite 150 "$WORK/suite.log" \
        "$PY" -m bench.throughput --device "$DEV" --out "$OUT" "${SUITE_ARGS[@]}"
    stage memory 70 "$WORK/memory.log" \
        "$PY" -m bench.memory --device "$DEV" --sweep t,grid --out "$OUT" "${MEM_ARGS[@]}"
fi

# ------------------------------------------------------------------------------ summary
# A stage killed mid-write can leave an atomic writer's temporary file behind.
find "$OUT" -maxdepth 1 -name '.*.tmp*' -type f -delete 2>/dev/null
{
    echo "# nca_fast GPU check"
    echo
    echo "- mode: $MODE"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); total $(( $(date +%s) - START )) s"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- device: $(grep -m1 '^cuda:0' "$OUT/env.txt" || echo 'no CUDA device')"
    echo "- $(grep -m1 '^torch:' "$OUT/env.txt")"
    echo "- $(grep -m1 '^triton:' "$OUT/env.txt")"
    echo "- install: $INSTALL"
    echo "- result: $([ $FAILED = 0 ] && echo 'every stage passed' || echo 'a stage FAILED')"
    echo
    echo "| stage | status | time |"
    echo "| --- | --- | --- |"
    cat "$STAGES"
    if [ -f "$OUT/tests.log" ]; then
        echo
        echo "## Tests (last lines of tests.log)"
        echo '```'
        tail -n 15 "$OUT/tests.log"
        echo '```'
    fi
    for s in ceilings suite memory install import; do
        [ -s "$WORK/$s.log" ] || continue
        echo
        echo "## $s"
        echo '```'
        # The full log is short for ceilings; for the others keep the table and the tail.
        tail -n 80 "$WORK/$s.log"
        echo '```'
    done
} >"$OUT/summary.md"
log "done: $([ $FAILED = 0 ] && echo PASS || echo FAIL); files in $OUT"
exit $FAILED
