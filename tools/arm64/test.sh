#!/usr/bin/env bash
# `make test-arm64`: the runtime on an emulated Raspberry Pi 4 (arm64, Cortex-A72).
#
#   1. tools/arm64/setup.sh: the arm64 bookworm root and its venv (cached; ~1 s
#      when there is nothing to do).
#   2. The project's tests inside the root, with the device's packages only
#      (runtime deps + pytest/hypothesis): host-only tests (converter search,
#      torch, model wheels) are skipped by tests/arm64/device_plugin.py.
#   3. Smoke (tests/arm64/smoke.py): convert real models on x86 with fixed bins;
#      decode and run them on arm64 under a 1 GB memory limit set from the
#      host; decoded weights must be bit-identical to the x86 decode (sha256
#      of every tensor and of the whole decoded model) and outputs within
#      tolerance of the x86 run on the same inputs. Peak memory is reported.
#
# Environment: ARM64_CPU (pi4; pi5, pi3 also work), ARM64_MEM (1G), HOST_PY (the
# x86 project venv's python, with moub[models]), ARM64_SKIP_TESTS=1 / ARM64_SKIP_SMOKE=1.
# Emulated timings are not Pi timings: qemu runs numpy and onnxruntime's
# vector code tens of times slower than a real board.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=lib.sh
source "$HERE/lib.sh"
REPO=$ARM64_REPO
HOST_PY=${HOST_PY:-$REPO/.venv/bin/python}
CPU=${ARM64_CPU:-pi4}
MEM=${ARM64_MEM:-1G}
[ -x "$HOST_PY" ] || die "no x86 project venv at $HOST_PY (run: make test, or set HOST_PY)"
cd "$REPO"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
SUMMARY=()

t=$(now)
"$HERE/setup.sh"
SUMMARY+=("setup (cached stages skipped): $(elapsed "$t") s")

# Every run: the repository read-only at its own path (nothing the emulated
# process does can touch the checkout), no bytecode or pytest cache written.
RUN=("$HERE/run.sh" --cpu "$CPU" --ro --env PYTHONDONTWRITEBYTECODE=1)

status=0
if [ "${ARM64_SKIP_TESTS:-0}" != 1 ]; then
    log "tests inside the root (--cpu $CPU = $(qemu_cpu_model "$CPU"))"
    t=$(now)
    "${RUN[@]}" --env PYTHONPATH="$REPO:$REPO/tests/arm64" --env HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis \
        "$REPO" python -m pytest -p device_plugin -p no:cacheprovider -rs --ignore=tests/arm64 tests || status=$?
    SUMMARY+=("tests under emulation: $(elapsed "$t") s (exit $status)")
fi

if [ "${ARM64_SKIP_SMOKE:-0}" != 1 ]; then
    WORK=$(mktemp -d /tmp/moub-arm64-smoke.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
    t=$(now)
    log "smoke: convert on x86 ($HOST_PY)"
    "$HOST_PY" tests/arm64/smoke.py prepare "$WORK"
    # The limit is set from the host (qemu-user ignores a `ulimit -v` set inside
    # the guest): run.sh --mem gives the guest exactly MEM of address space
    # (QEMU_RESERVED_VA) and caps the whole qemu process with RLIMIT_AS.
    log "baseline: python + the runtime's imports alone (--mem $MEM)"
    "${RUN[@]}" --mem "$MEM" --time --env PYTHONPATH="$REPO" "$REPO" \
        python -c 'import resource, moub_runtime, onnxruntime; print("[arm64] imports alone: peak RSS %d KiB (qemu process)" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)'
    for model in $("$HOST_PY" tests/arm64/smoke.py models); do
        # The same device step natively on x86, for a peak memory to compare with.
        "$HOST_PY" tests/arm64/smoke.py device "$WORK" --model "$model" >/dev/null
        log "smoke: $model on arm64 (--cpu $CPU, --mem $MEM)"
        "${RUN[@]}" --mem "$MEM" --time --also "$WORK" --env PYTHONPATH="$REPO" "$REPO" \
            python tests/arm64/smoke.py device "$WORK" --model "$model" || { status=$?; continue; }
    done
    # The guest must not see features the board lacks (qemu's max CPU would show SVE).
    case "$(qemu_cpu_model "$CPU")" in
        cortex-a72|cortex-a53) forbid=ASIMDHP,ASIMDDP,ASIMDFHM,SVE,SVE2 ;;  # ARMv8.0
        cortex-a76) forbid=SVE,SVE2 ;;                                     # ARMv8.2 + dotprod/fp16
        *) forbid="" ;;
    esac
    SMOKE_FORBID_CPU_FEATURES=$forbid "$HOST_PY" tests/arm64/smoke.py compare "$WORK" || status=$?
    SUMMARY+=("smoke (x86 convert + emulated decode/run): $(elapsed "$t") s")
fi

log "summary (emulated timings, not Raspberry Pi timings):"
for line in "${SUMMARY[@]}"; do log "  $line"; done
[ "$status" = 0 ] && log "PASS" || log "FAIL (exit $status)"
exit "$status"
