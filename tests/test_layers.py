"""Imports flow one way: models ← losses/ttt ← spec ← lit ← stages ← cli (README, "Layout").

Every import inside the package is read from the source (top-level and function-level alike) and
checked against the layer of the module it comes from: a module may import its own layer and the
layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metattt"

#: Bottom to top. The name is the first part of the module path below `metattt.`.
LAYERS: list[tuple[str, ...]] = [
    ("config", "atomic", "stats", "progress", "checkpointing", "endpoint", "errors"),  # foundations: the recipe, files, numbers, resume, bad-input errors
    ("models",),  # the target wrapper, the drafter kinds and their registry, LoRA
    ("anchors", "losses", "ttt", "data", "metrics", "tiny", "clbench"),  # losses, the inner loop, data
    ("spec",),  # speculative and guided decoding
    ("eval", "export"),  # experiments and reports; serving exports, the meta adapter
    ("lit", "distributed", "loading"),  # Lightning modules, trainer, loading a recipe's objects
    ("stages", "preflight", "serve", "bench"),  # one function per stage, its recipe checks; serving loop; cost ratios
    ("cli", "__main__"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` (a module run as a script may start the CLI)."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not _is_main_guard(n)]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("metattt"):
            mods = [node.module] if node.module != "metattt" else [f"metattt.{a.name}" for a in node.names]
            out += [(node.lineno, m) for m in mods]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("metattt.")]
    return out


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("metattt.") else module.split(".")[0]
    if top not in LAYER_OF:
        raise KeyError(top)
    return LAYER_OF[top]


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_module_has_a_layer():
    missing = sorted({_module(f).split(".")[0] for f in FILES} - set(LAYER_OF) - {""})
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: _module(p) or "metattt")
def test_imports_point_down(path):
    own = _module(path)
    if not own:
        return
    mine = _layer(f"metattt.{own}")
    wrong = [f"line {line}: {m} (layer {_layer(m)} > {mine})" for line, m in _imports(path) if _layer(m) > mine]
    assert not wrong, f"metattt.{own} (layer {mine}) imports upward: " + "; ".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from metattt.cli import main\n")
    assert _imports(bad) == [(2, "metattt.cli")] and _layer("metattt.cli") > _layer("metattt.models.drafter")
