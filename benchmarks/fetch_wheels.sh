#!/usr/bin/env bash
# Download, where PyPI is reachable, the wheels benchmarks/gpu_check.sh installs on a GPU machine
# without a network (torch, transformers and peft there; bitsandbytes, submitit and gguf not):
#
#   bash benchmarks/fetch_wheels.sh               # into benchmarks/wheels/
#
# The versions are those installed in this project's .venv (the tested ones); the platform tags
# are the GPU machine's (CPython $PY_VERSION, default 3.12, manylinux x86-64), not this machine's.
# bitsandbytes' wheel (~41 MiB) carries a native library for every CUDA and ROCm version; a device
# call sends the whole working tree (the tracked files are ~43 MiB) in at most 64 MiB, so only the
# libraries in $BNB_KEEP (default: the CPU's and CUDA 13.0 / 13.2's, for torch 2.11+cu130) are kept
# in it, and the wheel's RECORD is rewritten to match (BNB_KEEP=all keeps the wheel as it is).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
dest=${1:-$here/wheels}
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
fi
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$dest"
"$py" -m pip download --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
    "bitsandbytes==$(version bitsandbytes)" "submitit==$(version submitit)" "cloudpickle==$(version cloudpickle)" \
    "typing_extensions==$(version typing_extensions)" "gguf==$(version gguf)"

keep=${BNB_KEEP:-cpu cuda130 cuda132}
if [ "$keep" != all ]; then
    "$py" - "$keep" "$dest"/bitsandbytes-*.whl <<'EOF'
import os, re, sys, zipfile

keep, paths = sys.argv[1].split(), sys.argv[2:]
for path in paths:
    with zipfile.ZipFile(path) as src:
        libs = {n: m.group(1) for n in src.namelist() if (m := re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", n))}
        drop = {n for n, kind in libs.items() if kind not in keep}
        if not drop:
            print(f"{os.path.basename(path)}: already only {sorted(libs.values())}")
            continue
        with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):  # the list of installed files, with their hashes
                    data = b"".join(l for l in data.splitlines(True) if l.split(b",")[0].decode() not in drop)
                dst.writestr(info, data)
    os.replace(path + ".tmp", path)
    print(f"{os.path.basename(path)}: kept the libraries {sorted(k for k in libs.values() if k in keep)}, "
          f"dropped {len(drop)}; {os.path.getsize(path) / 2**20:.1f} MiB")
EOF
fi
du -sh "$dest"
ls -l "$dest"
