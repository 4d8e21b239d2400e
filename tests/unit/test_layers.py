"""scripts/check_layers.py: ctrl/ keeps the layering docs/architecture.md
writes down, and an import that breaks it is caught."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _checker()


def test_the_tree_keeps_its_layers():
    assert check.violations(ROOT, check.rules_from(DOC)) == []


def test_the_table_reads_as_the_doc_writes_it():
    rules = check.rules_from(DOC)
    assert rules["ctrl.util"] == set()
    assert rules["ctrl.model"] == {"ctrl.util", "ctrl.k8s"}
    assert "ctrl.runtime" not in rules["ctrl.dataplane"] and "ctrl.dataplane" in rules["ctrl.runtime"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of ctrl/ to break."""
    shutil.copytree(ROOT / "ctrl", tmp_path / "ctrl", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    "module,line,wanted",
    [
        pytest.param(
            "model/state.py",
            "from ..dataplane import abi\n",
            "ctrl.model imports ctrl.dataplane (ctrl.dataplane)",
            id="model-imports-the-dataplane",
        ),
        pytest.param(
            "k8s/objects.py",
            "def later():\n    from ctrl.runtime.agent import Agent\n",
            "ctrl.k8s imports ctrl.runtime.agent (ctrl.runtime)",
            id="lazy-import-of-a-higher-layer",
        ),
        pytest.param(
            "dataplane/apply.py",
            "from ..cli.dump import collect\n",
            "ctrl.dataplane imports ctrl.cli.dump (ctrl.cli)",
            id="dataplane-imports-the-cli",
        ),
        pytest.param(
            "model/plan.py",
            "import cffi\n",
            "ctrl.model imports cffi: only ctrl.dataplane touches the kernel",
            id="model-imports-cffi",
        ),
    ],
)
def test_an_import_that_breaks_the_layering_is_caught(tree: Path, module: str, line: str, wanted: str):
    path = tree / "ctrl" / module
    path.write_text(path.read_text() + "\n" + line)
    bad = check.violations(tree, check.rules_from(DOC))
    assert len(bad) == 1 and wanted in bad[0] and bad[0].startswith(f"ctrl/{module}:"), bad
    # The command fails the same way (make lint runs it).
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_layers.py"), "--root", str(tree)], capture_output=True, text=True
    )
    assert r.returncode == 1 and wanted in r.stdout


def test_an_allowed_import_passes(tree: Path):
    path = tree / "ctrl" / "runtime" / "agent.py"
    path.write_text(path.read_text() + "\nfrom ..model import topology\nfrom . import schedule\n")
    assert check.violations(tree, check.rules_from(DOC)) == []
