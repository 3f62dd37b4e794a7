# Emulated Raspberry Pi (arm64) tests, included by the Makefile. Not part of
# `make test`/CI: it needs root (debootstrap, chroot, binfmt_misc) and takes
# minutes. See tools/arm64/README.md.
#
#   make test-arm64                 build/refresh the arm64 root (cached), run the
#                                   runtime's tests in it and the x86 -> arm64 smoke
#   make test-arm64 ARM64_CPU=pi5   same on an emulated Pi 5 core (pi3 also works)
#   make test-arm64-floor           same with the lowest dependency versions pyproject
#                                   allows (tools/arm64/constraints-floor.txt, /opt/venv-floor)
#   make arm64-root                 only build/refresh the root (.arm64/root)
#   make arm64-probe-onnxruntime    which onnxruntime wheels run on pi4/pi3/pi5
#   make arm64-clean                delete the root (the next build takes ~10 min)
ARM64_CPU ?= pi4
ARM64_MEM ?= 1G
ARM64_ROOT ?= $(CURDIR)/.arm64/root
ARM64_ORT_VERSIONS ?= 1.18.1 1.19.2 1.20.1 1.21.0 1.21.1 1.22.1 1.23.2 1.24.4 1.25.1 1.26.0 1.27.0 1.28.0 1.29.0 1.30.0 1.31.1 1.32.0

.PHONY: test-arm64 test-arm64-floor arm64-root arm64-probe-onnxruntime arm64-clean

arm64-root:
	ARM64_ROOT=$(ARM64_ROOT) tools/arm64/setup.sh

test-arm64: $(STAMP)
	ARM64_ROOT=$(ARM64_ROOT) ARM64_CPU=$(ARM64_CPU) ARM64_MEM=$(ARM64_MEM) HOST_PY=$(CURDIR)/$(PY) tools/arm64/test.sh

test-arm64-floor: $(STAMP)
	ARM64_ROOT=$(ARM64_ROOT) ARM64_CPU=$(ARM64_CPU) ARM64_MEM=$(ARM64_MEM) HOST_PY=$(CURDIR)/$(PY) \
	ARM64_VENV=/opt/venv-floor ARM64_CONSTRAINTS=tools/arm64/constraints-floor.txt tools/arm64/test.sh

arm64-probe-onnxruntime: arm64-root $(STAMP)
	ARM64_ROOT=$(ARM64_ROOT) HOST_PY=$(CURDIR)/$(PY) tools/arm64/probe-onnxruntime.sh $(ARM64_ORT_VERSIONS)

arm64-clean:
	rm -rf --one-file-system $(ARM64_ROOT)
