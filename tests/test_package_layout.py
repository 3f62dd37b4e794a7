"""The package's shape: one name per module, no import circle, the converter's commands
registered with ``moub`` by entry point, and a clear message where they cannot load."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIPPED = {".git", ".venv", "build", "node_modules", "__pycache__"}


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _python_files():
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if not SKIPPED.intersection(parts) and not any(p.endswith(".egg-info") for p in parts):
            yield path


def test_nothing_imports_the_converter_by_its_folder_name():
    """``converters/`` installs as ``moub_converters``; importing it as ``converters`` would load
    its files a second time as other modules, with their own state."""
    folder_import = re.compile(r"^\s*(from\s+converters(\.|\s)|import\s+converters(\.|\s|$))", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in _python_files() if folder_import.search(p.read_text(errors="replace"))]
    assert offenders == []


def test_the_converter_package_has_no_import_circle():
    graph = _import_graph()
    edges = graph.graph(REPO / "converters", "moub_converters")
    assert "moub_converters.modes.adaptive" in edges and "moub_converters.api" in edges["moub_converters"]
    assert graph.find_cycle(edges) is None, graph.find_cycle(edges)


def test_the_import_graph_tool_finds_a_circle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .sub import c\n")
    (package / "sub" / "__init__.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("from .. import a\n")
    graph = _import_graph()
    edges = graph.graph(package, "pkg")
    assert edges["pkg.a"] == {"pkg.sub", "pkg.sub.c"} and edges["pkg.sub.c"] == {"pkg.a"}
    assert graph.find_cycle(edges) == ["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"]
    run = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), str(package), "pkg"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "import circle: a -> sub -> sub.c -> a" in run.stderr


def test_the_runtime_does_not_name_the_converter():
    source = (REPO / "moub_runtime" / "cli.py").read_text()
    assert "moub_converters" not in source and "converters" not in source


def test_convert_and_demo_are_registered_moub_commands():
    from moub_runtime.cli import plugin_commands

    commands = plugin_commands()
    assert {"convert", "demo"} <= set(commands)
    assert commands["convert"].value.startswith("moub_converters.cli:")
    assert commands["convert"].extras == ["convert"]


def test_a_command_whose_extra_is_missing_says_how_to_install_it(tmp_path):
    """Without the converter's dependencies (pymoo here), ``moub convert`` is one line, exit 2."""
    code = ("import sys\nsys.modules['pymoo'] = None\nfrom moub_runtime.cli import main\n"
            f"sys.exit(main(['convert', 'model.onnx', '-o', {str(tmp_path / 'out.moub')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "moub convert is not installed: pip install 'moub[convert]'" in lines[0], run.stderr
    assert not (tmp_path / "out.moub").exists()
