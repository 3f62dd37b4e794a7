#!/usr/bin/env bash
# Which onnxruntime aarch64 wheels import and run on each emulated Pi core.
#
# The evidence behind the onnxruntime bound in pyproject.toml. For each
# VERSION: download the cp311 manylinux aarch64 wheel on the host (cached in
# .arm64/wheels), unpack it inside the root (cached), then import it and run two
# real models (rapidocr's text-direction classifier: Conv/BatchNorm/pooling;
# magika: embedding/MatMul/LayerNorm) under each --cpu. onnxruntime below 1.19
# was built against numpy 1.x, so those get numpy 1.26.4 on the path.
#
# Usage: tools/arm64/probe-onnxruntime.sh [--cpus "pi4 pi3 pi5 max"] VERSION...
# Prints one line per version and CPU: ok, SIGILL, SIGSEGV or error (+ reason).
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=lib.sh
source "$HERE/lib.sh"

CPUS="pi4 pi3 pi5"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) CPUS=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || die "usage: $0 [--cpus \"pi4 pi3 pi5\"] VERSION..."
require_root
[ -e "$ARM64_STATE/venv" ] || die "$ARM64_ROOT is not set up; run $HERE/setup.sh first"
ensure_binfmt || die "cannot register the qemu-aarch64 binfmt_misc handler"

HOST_PY=${HOST_PY:-$ARM64_REPO/.venv/bin/python}
CACHE=$ARM64_REPO/.arm64/wheels
PROBE=/opt/ort-probe            # inside the root
mkdir -p "$CACHE" "$ARM64_ROOT$PROBE/models"
PLATFORMS=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_36; do
    PLATFORMS+=(--platform "${tag}_aarch64")
done

fetch() {  # $1 = package, $2 = version -> unpacked into $ARM64_ROOT$PROBE/$1-$2
    local dest="$ARM64_ROOT$PROBE/$1-$2" whl
    [ -e "$dest/.done" ] && return 0
    whl=$(ls "$CACHE/$1-$2-"*aarch64*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$whl" ]; then
        PIP_FIND_LINKS="" "$HOST_PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" \
            --python-version 3.11 --implementation cp "$1==$2" -d "$CACHE" >&2
        whl=$(ls "$CACHE/$1-$2-"*aarch64*.whl | head -n1)
    fi
    rm -rf "$dest" && mkdir -p "$dest"
    "$HOST_PY" -m zipfile -e "$whl" "$dest"
    touch "$dest/.done"
}

# The models, copied from the x86 venv's model wheels.
"$HOST_PY" - "$ARM64_ROOT$PROBE/models" <<'EOF'
import importlib.util, shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
for pkg, rel, name in [("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "cls.onnx"),
                       ("magika", "models/standard_v3_3/model.onnx", "magika.onnx")]:
    src = Path(list(importlib.util.find_spec(pkg).submodule_search_locations)[0]) / rel
    if not (out / name).exists():
        shutil.copyfile(src, out / name)
EOF
cat > "$ARM64_ROOT$PROBE/probe.py" <<'EOF'
import numpy as np
import onnxruntime as ort
rng = np.random.default_rng(0)
feeds = {"cls.onnx": {"x": rng.uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)},
         "magika.onnx": {"bytes": rng.integers(0, 257, (2, 2048)).astype(np.int32)}}
for name, feed in feeds.items():
    session = ort.InferenceSession("/opt/ort-probe/models/" + name, providers=["CPUExecutionProvider"])
    out = session.run(None, feed)[0]
    assert np.isfinite(out).all(), name
print("numpy", np.__version__)
EOF

fetch numpy 1.26.4
for version in "$@"; do
    fetch onnxruntime "$version"
    path="$PROBE/onnxruntime-$version"
    case "$version" in 1.1[0-8].*) path="$path:$PROBE/numpy-1.26.4" ;; esac
    for cpu in $CPUS; do
        status=0
        out=$(ARM64_CPU=$cpu in_root env PYTHONPATH="$path" PYTHONDONTWRITEBYTECODE=1 \
              python /opt/ort-probe/probe.py 2>&1) || status=$?
        case "$status" in
            0) verdict="ok ($(echo "$out" | tail -n1))" ;;
            132) verdict="SIGILL (illegal instruction)" ;;
            139) verdict="SIGSEGV" ;;
            134) verdict="SIGABRT: $(echo "$out" | grep -v '^\s*$' | tail -n1 | cut -c1-150)" ;;
            *) verdict="error $status: $(echo "$out" | grep -v '^\s*$' | tail -n1 | cut -c1-150)" ;;
        esac
        printf 'onnxruntime %-7s %-4s (%s): %s\n' "$version" "$cpu" "$(qemu_cpu_model "$cpu")" "$verdict"
    done
done
