#!/usr/bin/env bash
# The prepared GPU check of the 7B path, for a machine with one GPU and no network:
#
#   bash benchmarks/gpu_check.sh OUTDIR          # or with $OUT set: bash benchmarks/gpu_check.sh
#   DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/gpu_check_cpu    # the same on the CPU (tiny dry run)
#
# 1. Installs what a bare torch machine lacks (bitsandbytes, submitit and its cloudpickle and
#    typing_extensions, gguf) from the wheels brought along in benchmarks/wheels/
#    (benchmarks/fetch_wheels.sh downloads them where PyPI is reachable), only for the modules
#    that fail to import, into a folder of the run put first on PYTHONPATH: the image is not touched.
# 2. Runs benchmarks/gpu_check.py: the steps a (dry run at the 7B shape), b (both presets end to
#    end on a tiny Qwen2), c (SIGTERM and --resume), d (--executor local), each in its own process
#    with its own time limit, all within BUDGET_S (default 450 s on a GPU).
#
# Writes OUTDIR/gpu_check.json and beside it at most six logs: setup.log and one per step.
# Environment: DEVICE=auto|cpu|cuda, STEPS=abcd, PYTHON, MAX_TRAIN, MAX_EVAL, EPOCHS, BUDGET_S,
# LIMIT_FACTOR (the steps' own limits times this; default 1 on a GPU, 4 on the CPU),
# DRY_RUN_PROTOCOLS ("written"; "written published" for both), DRY_RUN_ARGS (more dry-run flags),
# FORCE_INSTALL=1 (install the wheels even where the modules import), KEEP_WORK=1 (keep the runs'
# temporary folder).
# Exit status: 0 when every step passed, 1 otherwise, 2 for a usage error.
set -u

# all in one function, read whole before it runs: editing this file while it runs cannot derail it
main() {
    started=$(date +%s)
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    root=$(dirname "$here")
    out=${OUT:-${1:-}}
    if [ -z "$out" ]; then
        echo "usage: bash benchmarks/gpu_check.sh OUTDIR (or set OUT)" >&2
        exit 2
    fi
    case ${DEVICE:-auto} in
        auto|cpu|cuda) ;;
        *) echo "DEVICE must be auto, cpu or cuda, not ${DEVICE}" >&2; exit 2 ;;
    esac
    mkdir -p "$out" || exit 2
    out=$(cd "$out" && pwd)
    py=${PYTHON:-}
    if [ -z "$py" ]; then
        if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    trap '[ "${KEEP_WORK:-0}" = 1 ] && echo "runs kept in $work" || rm -rf "$work"' EXIT

    # --- 1. the wheels: import name -> wheel name, for whichever module does not import
    missing=$(
        FORCE_INSTALL=${FORCE_INSTALL:-0} timeout 120 "$py" - <<'EOF'
import importlib, os
for module, wheel in (("bitsandbytes", "bitsandbytes"), ("submitit", "submitit"), ("cloudpickle", "cloudpickle"),
                      ("typing_extensions", "typing_extensions"), ("gguf", "gguf")):
    try:
        if os.environ["FORCE_INSTALL"] == "1":
            raise ImportError("FORCE_INSTALL=1")
        importlib.import_module(module)
    except Exception:
        print(wheel)
EOF
    )
    missing=$(echo $missing)  # one line
    {
        echo "$(date -Is) gpu_check on $(hostname): python $py"
        if [ -n "$missing" ]; then
            echo "not importable, installing from $here/wheels into $work/site: $missing"
            # --no-deps: every dependency that could be missing is in the list above; the rest (torch,
            # numpy, packaging, pyyaml, requests, tqdm) come with torch and transformers
            if timeout 180 "$py" -m pip install --no-index --find-links "$here/wheels" --no-deps --no-cache-dir --no-compile \
                --target "$work/site" $missing; then
                export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
            else
                echo "installing the wheels failed (exit $?): the steps that need them will fail"
            fi
        else
            echo "bitsandbytes, submitit, cloudpickle, typing_extensions and gguf import: nothing to install"
        fi
    } > "$out/setup.log" 2>&1
    cat "$out/setup.log"

    # --- 2. the steps
    cd "$root" || exit 2
    "$py" "$here/gpu_check.py" "$out" --work "$work" --installed "$missing" --started "$started" 2>&1 | tee -a "$out/setup.log"
    exit "${PIPESTATUS[0]}"
}

main "$@"
exit $?
