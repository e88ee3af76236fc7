"""Every bench/ script has a real --help (what it measures, examples, its summary line) that measures
nothing, and ends its output with the ``name: value`` line its help names."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Modules that scripts import, not scripts: no command line of their own, so no --help to check.
MODULES = {
    "benchcli": "the command line every script shares",
    "restore_stages": "the end-to-end cases of bench/restore.py (--end-to-end, --folder)",
}
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.stem not in MODULES)
LAST_LINE = re.compile(r"The last line is ``([a-z0-9_]+): ")


def load(script: Path):
    name = f"bench_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_script_is_checked():
    assert len(SCRIPTS) >= 10 and {"shards", "gpu_check_children", "loader"} <= {p.stem for p in SCRIPTS}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_not_scripts(name, monkeypatch):
    """A module left out of the --help check is imported by a script and has no ``main``."""
    monkeypatch.syspath_prepend(str(BENCH))
    module = load(BENCH / f"{name}.py")
    assert not hasattr(module, "main")
    users = [p.name for p in SCRIPTS if f"import {name}" in p.read_text() or f"from {name} import" in p.read_text()]
    assert users, f"bench/{name}.py: no script imports it"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_explains_and_measures_nothing(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = load(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        module.main(["--help"])
    text = out.getvalue()
    assert done.value.code == 0
    assert text.startswith("usage: ") and "\nexamples:\n" in text and f"python bench/{script.name}" in text
    summary = LAST_LINE.search(" ".join(text.split()).replace("the last line", "The last line"))
    assert summary, "the help names the summary line"
    code = script.read_text().replace(module.__doc__, "")  # the name also in the code, not only in the help
    literals = re.findall(r"[\"']([a-z0-9_]{6,})[{:\"']", code)  # "name: ..., f"name_{n}..., NAME = "name"
    assert any(summary.group(1).startswith(lit) for lit in literals), f"{summary.group(1)}: not printed"
