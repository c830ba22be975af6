#!/usr/bin/env bash
# The one-call GPU check, figures first: install and record the machine, run the selftest, the
# benchmark suite (the fused kernels against eager and torch.compile at 1024^2 first), the
# machine's ceilings and the memory sweep, then a focused GPU test subset, and with the time
# left a 512-cell training run; everything is written into OUTDIR.
#
#   bench/gpu_check.sh OUTDIR
#
# For a GPU machine with torch and triton installed and no network; at most 6 minutes (each
# stage has its own limit, cut to what is left of the whole run's; the Python stages stop
# themselves earlier through --time-budget so that what they measured is written). A failing
# stage does not stop the others. OUTDIR gets at most 8 flat files, each under 16 MB: env.txt,
# tests.log, throughput.csv, throughput.png, memory.csv, summary.md (the stages' table, the
# selftest's verdict, the ceilings' table and every other stage's log tail), and from the hires
# stage hires512.safetensors and hires512.png.
#
# Stages, in order:
#   install   pip install -e . (no dependencies, no build isolation: no network needed)
#   selftest  python -m nca_fast.selftest: the kernels against the float64 reference, and a
#             1024^2 forward and training step against eager (under a minute)
#   suite     bench.throughput: 1x1024x1024@16 (nca_fast-triton, torch-eager, torch-compile),
#             8x72x72@64, 1x4096x4096@16, 1x16384x16384@4 forward (torch.compile left out of
#             the large grids: it compiles anew for every shape)
#   ceilings  bench.ceilings: matmul and copy rates of the machine, measured once
#   memory    bench.memory --memcheck and the T / grid sweeps
#   tests     the kernel and custom-op tests on CUDA (pytest-xdist when installed); stopped
#             with SIGINT at its limit (default 120 s), so pytest still prints the failures
#   hires     after the checks' 350 s, NCA_FAST_GPU_CHECK_HIRES_S more (default 90; with what
#             the checks left unused, at least 60 s): the hires512 preset trained from flower96
#             with the backend that passed the selftest (triton, else torch) until that
#             deadline; SIGTERM makes the trainer save a checkpoint, the run is then finished
#             at that step (--resume --steps N: the model and its growth picture), and the
#             model (best.safetensors when kept, else model.safetensors) and final.png are
#             copied to OUTDIR as hires512.safetensors and hires512.png
#
# Exit status: 0 when every stage passed, 1 when one failed or timed out, 2 on a usage error.
#
# Environment:
#   NCA_FAST_GPU_CHECK_DRY=1       skip install and every CUDA stage; write env.txt and
#                                  summary.md only (checks this script on a machine with no GPU)
#   NCA_FAST_GPU_CHECK_REHEARSE=1  run every stage on the CPU at tiny sizes, the kernels in
#                                  Triton's interpreter (a dress rehearsal of the whole script;
#                                  a few minutes on a 2-core machine)
#   NCA_FAST_GPU_CHECK_TESTS=...   pytest targets of the tests stage (default: the kernel and
#                                  custom-op tests)
#   NCA_FAST_GPU_CHECK_TESTS_S=N   the tests stage's limit in seconds (default 120)
#   NCA_FAST_GPU_CHECK_HIRES=0     skip the hires stage
#   NCA_FAST_GPU_CHECK_HIRES_S=N   seconds the hires stage may run past the checks' limit
#                                  (default 90: the whole script then ends within 440 s)
#   NCA_FAST_GPU_CHECK_SECONDS=N   the whole run's limit (default 350)
#   PYTHON=...                     the interpreter (default: python3)
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

PY=${PYTHON:-python3}
DRY=${NCA_FAST_GPU_CHECK_DRY:-0}
REHEARSE=${NCA_FAST_GPU_CHECK_REHEARSE:-0}
TESTS=${NCA_FAST_GPU_CHECK_TESTS:-tests/test_kernels.py tests/test_custom_op.py}
WORK=$(mktemp -d)
trap 'rm -rf -- "$WORK"' EXIT
STAGES="$WORK/stages.md"
FAILED=0
START=$(date +%s)
# Every stage's limit is cut to what is left of 350 s, so the whole run stays under 6 minutes.
# A rehearsal is CPU-bound: 240 s in all, its stages limited by that alone.
if [ "$REHEARSE" = 1 ]; then TOTAL=${NCA_FAST_GPU_CHECK_SECONDS:-240}; SLACK=240
else TOTAL=${NCA_FAST_GPU_CHECK_SECONDS:-350}; SLACK=0; fi
DEADLINE=$(( START + TOTAL ))
if [ "$DRY" = 1 ]; then MODE="dry run (no CUDA stage)"
elif [ "$REHEARSE" = 1 ]; then MODE="rehearsal on the CPU (tiny sizes; not GPU figures)"
else MODE="GPU"; fi
: >"$STAGES"

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }

# stage NAME LIMIT_S LOGFILE CMD... : run CMD under timeout, record PASS / FAIL / TIMEOUT.
# STAGE_SIGNAL (default TERM) is the signal sent at the limit; KILL follows 10 s later.
stage() {
    local name=$1 limit=$2 logfile=$3 t0 rc dt status left
    shift 3
    t0=$(date +%s)
    left=$(( DEADLINE - t0 - 12 ))
    if [ "$left" -lt 5 ]; then
        printf '| %s | NOT RUN: no time left of the %d s | - |\n' "$name" "$TOTAL" >>"$STAGES"
        log "$name: not run, no time left"
        FAILED=1
        return 1
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    log "$name: starting (limit ${limit} s)"
    timeout -s "${STAGE_SIGNAL:-TERM}" -k 10 "$limit" "$@" >"$logfile" 2>&1
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

# cap FILE: keep a log under 16 MB (its last 15 MB) so that every file in OUTDIR comes back.
cap() {
    if [ -f "$1" ] && [ "$(wc -c <"$1")" -gt 16000000 ]; then
        tail -c 15000000 "$1" >"$WORK/cap.tmp" && mv "$WORK/cap.tmp" "$1"
    fi
}

skip() { printf '| %s | skipped: %s | - |\n' "$1" "$2" >>"$STAGES"; }

# hires_stage: the hires512 preset from flower96 until its deadline (see the header). Not run
# (and not a failure) when less than 60 s are left or NCA_FAST_GPU_CHECK_HIRES=0.
hires_stage() {
    local left t0 rc dt step backend finish=45 run="$WORK/hires" status model
    left=$(( DEADLINE + ${NCA_FAST_GPU_CHECK_HIRES_S:-90} - $(date +%s) - 12 ))
    if [ "${NCA_FAST_GPU_CHECK_HIRES:-1}" = 0 ]; then skip hires "NCA_FAST_GPU_CHECK_HIRES=0"; return 0; fi
    if [ "$left" -lt 60 ]; then skip hires "${left} s left (needs 60)"; return 0; fi
    # The backend the selftest passed with: the fused kernels, else the PyTorch path.
    backend=torch
    grep -qE '^selftest: PASS' "$WORK/selftest.log" 2>/dev/null && [ "$DEV" = cuda ] && backend=triton
    local args=(--preset hires512 --hidden 64 --init flower96 --backend "$backend" --device "$DEV"
                --save-every 25 --no-progress --out "$run")
    if [ "$REHEARSE" = 1 ]; then
        # A few steps at 16 cells on the CPU (the same commands, not GPU figures).
        args+=(--size 16 --pad 4 --batch 1 --pool-size 4 --rollout 8 12 --loss-levels 1
               --late-loss 0 --save-every 2 --no-stability --threads 1)
    fi
    local limit=$(( left - finish ))
    # The rehearsal stops its run after 20 s, so that the stop and the finish are rehearsed too.
    [ "$REHEARSE" = 1 ] && [ "$limit" -gt 20 ] && limit=20
    t0=$(date +%s)
    log "hires: starting (limit $limit s)"
    timeout -s TERM -k 20 "$limit" "$PY" -m nca_fast.train "${args[@]}" \
        >"$WORK/hires.log" 2>&1
    rc=$?
    # Stopped at the deadline: the trainer saved a checkpoint at step N; finish the run there.
    step=$(sed -n 's/.*stopped by SIG[A-Z]* at step \([0-9][0-9]*\).*/\1/p' "$WORK/hires.log" | tail -n 1)
    if [ -n "$step" ]; then
        timeout -s TERM -k 10 $(( finish - 10 )) "$PY" -m nca_fast.train --resume "$run" \
            --steps "$step" --no-progress >>"$WORK/hires.log" 2>&1
        rc=$?
    fi
    model="$run/best.safetensors"
    [ -f "$model" ] || model="$run/model.safetensors"
    if [ -f "$model" ] && [ -f "$run/final.png" ]; then
        cp "$model" "$OUT/hires512.safetensors" && cp "$run/final.png" "$OUT/hires512.png"
        status="PASS (${step:-all} steps, $backend)"
        [ "$rc" = 0 ] || { status="FAIL (exit $rc)"; FAILED=1; }
    else
        status="FAIL (exit $rc, no model written)"
        FAILED=1
    fi
    dt=$(( $(date +%s) - t0 ))
    printf '| hires | %s | %d s |\n' "$status" "$dt" >>"$STAGES"
    log "hires: $status in ${dt} s"
}

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
CHECKS="selftest suite ceilings memory tests hires"
if [ "$DRY" = 1 ]; then
    for s in $CHECKS; do skip "$s" "$MODE"; done
elif [ "$IMPORTABLE" = 0 ]; then
    for s in $CHECKS; do
        printf '| %s | NOT RUN: nca_fast.kernels is not importable (see install) | - |\n' "$s" \
            >>"$STAGES"
    done
else
    if [ "$REHEARSE" = 1 ]; then
        DEV=cpu
        # the kernels in Triton's interpreter, the suite's Triton paths included
        export TRITON_INTERPRET=1 NCA_FAST_BENCH_INTERPRETED=1
        CEIL_ARGS=(--matmul-size 256 --copy-bytes 4194304)
        SUITE_ARGS=(--sizes 1x16x16@2,1x8x8@1 --repeats 1 --threads 1 --time-budget 60
                    --providers nca_fast-triton,torch-eager)
        MEM_ARGS=(--quick --repeats 1 --threads 1 --providers nca_fast-torch,torch-eager)
        TESTS=${NCA_FAST_GPU_CHECK_TESTS:-tests/test_kernels.py::test_update_mask_forward_and_backward_agree_with_rng}
    else
        DEV=cuda
        CEIL_ARGS=()
        # Most important first: a time budget cuts the tail. torch.compile compiles anew for
        # every shape (tens of seconds each): measured at 1024^2 and the article's size only.
        # 1024^2 at 16 steps: the eager port keeps ~2 KB per cell-step for its backward
        # (64 steps would not fit 80 GB); 4096^2 training is out of its reach at any T here.
        SUITE_ARGS=(--sizes "1x1024x1024@16,8x72x72@64,1x4096x4096@16,1x16384x16384@4/forward"
                    --providers nca_fast-triton,torch-eager,torch-compile --time-budget 95
                    --exclude "torch-compile@1x4096x4096,torch-compile@1x16384x16384")
        MEM_ARGS=(--memcheck --time-budget 40 --providers nca_fast-triton,torch-eager)
    fi
    stage selftest $(( 100 + SLACK )) "$WORK/selftest.log" "$PY" -m nca_fast.selftest --device "$DEV"
    stage suite $(( 110 + SLACK )) "$WORK/suite.log" \
        "$PY" -m bench.throughput --device "$DEV" --out "$OUT" --no-floor "${SUITE_ARGS[@]}"
    stage ceilings $(( 25 + SLACK )) "$WORK/ceilings.log" \
        "$PY" -m bench.ceilings --device "$DEV" --out "$WORK/ceilings.csv" ${CEIL_ARGS[@]+"${CEIL_ARGS[@]}"}
    # memory.csv to OUTDIR; its plot stays behind (OUTDIR's 8 files: the hires stage needs two).
    mkdir -p "$WORK/memory"
    stage memory $(( 50 + SLACK )) "$WORK/memory.log" \
        "$PY" -m bench.memory --device "$DEV" --sweep t,grid --out "$WORK/memory" "${MEM_ARGS[@]}"
    [ -f "$WORK/memory/memory.csv" ] && cp "$WORK/memory/memory.csv" "$OUT/memory.csv"
    # The tests last, with what is left (GPU tolerances chosen by the tests when CUDA is
    # visible); SIGINT at the limit makes pytest stop and print the failures it has.
    XDIST=()
    if [ "$DEV" = cuda ] && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi
    # shellcheck disable=SC2086  # TESTS is a list of pytest targets
    STAGE_SIGNAL=INT stage tests "${NCA_FAST_GPU_CHECK_TESTS_S:-$(( 120 + SLACK ))}" "$OUT/tests.log" \
        "$PY" -m pytest -q $TESTS -m "not slow" -p no:cacheprovider -rfE ${XDIST[@]+"${XDIST[@]}"}
    cap "$OUT/tests.log"
    hires_stage
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
    if [ -s "$WORK/selftest.log" ]; then
        echo "- $(grep -E '^selftest: (PASS|FAIL)' "$WORK/selftest.log" | tail -n 1 || true)"
    fi
    echo
    echo "| stage | status | time |"
    echo "| --- | --- | --- |"
    cat "$STAGES"
    if [ -f "$OUT/tests.log" ]; then
        echo
        echo "## Tests (last lines of tests.log)"
        echo '```'
        tail -n 40 "$OUT/tests.log" | cut -c 1-2000
        echo '```'
    fi
    if [ -s "$WORK/ceilings.csv" ]; then
        echo
        echo "## ceilings.csv"
        echo '```'
        cat "$WORK/ceilings.csv"
        echo '```'
    fi
    for s in selftest suite ceilings memory hires install import; do
        [ -s "$WORK/$s.log" ] || continue
        echo
        echo "## $s"
        echo '```'
        # The full log is short for selftest and ceilings; for the others the table and tail.
        tail -n 80 "$WORK/$s.log" | cut -c 1-2000
        echo '```'
    done
} >"$OUT/summary.md"
log "done: $([ $FAILED = 0 ] && echo PASS || echo FAIL); files in $OUT"
exit $FAILED
