"""The docs' code runs as written, and the layers import one way (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_every_example_in_docs_api_runs_top_to_bottom(tmp_path, monkeypatch):
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 10
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that broke
            pytest.fail(f"docs/api.md python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    assert (tmp_path / "runs" / "digits.kdc").is_dir()


def imports_of(path: Path) -> set[str]:
    """Every absolute module a file imports (any depth, including imports inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


STAGE_ONE = {"kdcache.teach", "kdcache.distributed", "kdcache.verify", "kdcache.demo"}
STAGE_TWO = ["train.py", "loader.py", "soft_labels.py", "replay.py", "losses.py", "ensemble.py", "sparse.py",
             "sampled.py", "corrections.py", "store.py", "describe.py", "data.py", "models.py", "fidelity.py",
             *(f"{pkg}/{p.name}" for pkg in ("records", "views") for p in (ROOT / "pipeline" / pkg).glob("*.py"))]


@pytest.mark.parametrize("module", STAGE_TWO)
def test_stage_two_does_not_import_stage_one(module):
    assert not imports_of(ROOT / "pipeline" / module) & STAGE_ONE


@pytest.mark.parametrize("path", sorted((ROOT / "stores").glob("*.py")), ids=lambda p: p.name)
def test_stores_import_neither_torch_nor_the_pipeline(path):
    bad = {m for m in imports_of(path) if m.split(".")[0] == "torch"
           or (m.startswith("kdcache") and not m.startswith("kdcache.stores"))}
    assert not bad, bad


@pytest.mark.parametrize("path", sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stores").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_cli(path):
    assert not {m for m in imports_of(path) if m.startswith("kdcache.cli")}


def test_verify_replays_a_store_without_stage_one():
    """verify rebuilds a teacher through kdcache.models, not through the stage-one loop (kdcache.teach)."""
    assert not imports_of(ROOT / "pipeline" / "verify.py") & {"kdcache.teach", "kdcache.distributed"}
