"""The package layout's promises: ``restorer`` never imports ``shard_tools``."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import restorer

REPO = Path(__file__).resolve().parents[1]


def test_restorer_does_not_import_shard_tools():
    names = sorted(m.name for m in pkgutil.walk_packages(restorer.__path__, "restorer."))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'shard_tools' or m.startswith('shard_tools.'))\n"
        "print(len(sys.modules)); assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(names) >= 20
