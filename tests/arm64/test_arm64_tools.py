"""Cheap x86 checks of the emulated-arm64 tooling (the arm64 suite itself runs
only with `make test-arm64`: it needs root and takes minutes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "tools" / "arm64").glob("*.sh"))
sys.path.insert(0, str(Path(__file__).parent))
import smoke  # noqa: E402


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_targets_exist_and_make_test_stays_off_arm64():
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "test-arm64", "arm64-root"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "tools/arm64/test.sh" in dry.stdout and "tools/arm64/setup.sh" in dry.stdout
    ci = subprocess.run(["make", "-n", "-C", str(REPO), "test"], capture_output=True, text=True)
    assert ci.returncode == 0 and "arm64" not in ci.stdout


def _pins(name: str = "constraints.txt") -> dict[str, str]:
    pins = {}
    for line in (REPO / "tools" / "arm64" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_tested_pins_satisfy_the_runtime_dependency_bounds():
    """tools/arm64/constraints.txt (what the emulated Pi 4 ran) must lie inside
    pyproject's base dependencies, else setup.sh's pip install fails."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    pins = _pins()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a runtime dependency but not pinned in constraints.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {dep}"
    # onnxruntime 1.21.0 dies with SIGILL on Cortex-A72 (Pi 4): never allowed.
    ort = next(Requirement(d) for d in deps if Requirement(d).name == "onnxruntime")
    assert not ort.specifier.contains("1.21.0")


def test_floor_pins_are_the_lower_bounds():
    """`make test-arm64-floor` tests exactly the lowest versions pyproject allows."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    floor = _pins("constraints-floor.txt")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        lower = [s.version for s in dep.specifier if s.operator == ">="]
        assert lower, f"{dep} has no lower bound"
        name = dep.name.lower().replace("_", "-")
        assert dep.specifier.contains(floor[name]), f"{name}=={floor[name]} is outside {dep}"
        # the bound itself or a patch release of it (numpy>=1.24 -> 1.24.4), never a newer minor
        assert floor[name].split(".")[:2] == lower[0].split(".")[:2], f"{name}: floor pin {floor[name]} vs bound {lower[0]}"


def _fake_run(work: Path, arm_output: np.ndarray, arm_digest: str = "d") -> None:
    manifest = {"bins": 4, "rtol": 1e-4, "atol": 1e-5, "models": {"m": {
        "onnx_bytes": 10, "moub_bytes": 5, "tensors": {"w": "d"}, "model_sha256": "s"}}}
    (work / "manifest.json").write_text(json.dumps(manifest))
    np.savez(work / "m.x86.npz", y=np.array([[0.25, 0.75]], np.float32))
    np.savez(work / "m.aarch64.npz", y=arm_output)
    (work / "m.aarch64.json").write_text(json.dumps({
        "machine": "aarch64", "numpy": "2", "onnxruntime": "1", "cpu_features": ["ASIMD"],
        "tensors": {"w": arm_digest}, "model_sha256": "s", "peak": {"ru_maxrss_kib": 1024}, "address_space_mib_at_exit": 300.0,
        "forbidden_modules_loaded": []}))


def test_smoke_compare_passes_within_tolerance(tmp_path):
    _fake_run(tmp_path, np.array([[0.250001, 0.749999]], np.float32))
    assert smoke.compare(tmp_path) == 0


def test_smoke_compare_fails_on_a_changed_weight_or_output(tmp_path):
    _fake_run(tmp_path, np.array([[0.25, 0.75]], np.float32), arm_digest="other")
    assert smoke.compare(tmp_path) == 1
    _fake_run(tmp_path, np.array([[0.26, 0.74]], np.float32))
    assert smoke.compare(tmp_path) == 1
