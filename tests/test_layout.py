"""The package's shape: no module reaches into another module's private names.

A leading underscore says "this module may change it without notice"; a second module importing it would
break silently when it does. Checked on the source with ``ast`` (nothing is imported or run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import focus_detr

PACKAGE = Path(focus_detr.__file__).resolve().parent


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(module: Path, level: int, target: str | None) -> str:
    """Dotted name of a relative or absolute ``from`` import made in ``module``."""
    if level == 0:
        return target or ""
    parts = ["focus_detr", *module.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1]  # a module's package; for an __init__.py, the package itself
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, target] if target else base)


def private_imports(root: Path = PACKAGE) -> list[str]:
    """``path:line: what`` for every import of a private name of another focus_detr module, and every
    ``module._name`` attribute read through a focus_detr module imported by name."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module_aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(path, node.level, node.module)
                if not source.startswith("focus_detr"):
                    continue
                for alias in node.names:
                    if _private(alias.name):
                        problems.append(f"{path.relative_to(root)}:{node.lineno}: from {source} import {alias.name}")
                    else:
                        module_aliases.add(alias.asname or alias.name)  # may be a module; checked below
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("focus_detr") and alias.asname:
                        module_aliases.add(alias.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and _is_module(path, node.value.id, tree)):
                problems.append(f"{path.relative_to(root)}:{node.lineno}: {node.value.id}.{node.attr}")
    return problems


def _is_module(path: Path, name: str, tree: ast.AST) -> bool:
    """Whether ``name`` was bound by importing a focus_detr module (not a class or function)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(path, node.level, node.module)
            for alias in node.names:
                if (alias.asname or alias.name) == name and source.startswith("focus_detr"):
                    candidate = PACKAGE.parent.joinpath(*source.split("."), alias.name)
                    return candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists()
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname == name and alias.name.startswith("focus_detr"):
                    return True
    return False


def test_no_module_imports_a_private_name_of_another() -> None:
    problems = private_imports()
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def test_the_check_finds_a_private_import(tmp_path: Path) -> None:
    """The checker itself: a planted private import and a private attribute of an imported module are found."""
    pkg = tmp_path / "focus_detr"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def _helper():\n    pass\n")
    (pkg / "sub" / "b.py").write_text("from .a import _helper\nfrom . import a\nx = a._helper\nfrom .a import ok\n")
    (pkg / "sub" / "c.py").write_text("from torch.utils._python_dispatch import TorchDispatchMode\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        found = private_imports(pkg)
    finally:
        PACKAGE = saved
    assert found == ["sub/b.py:1: from focus_detr.sub.a import _helper", "sub/b.py:3: a._helper"]
