"""`make lint` covers every Python file of the repository: a folder left out of the lint line drifts from the style
unseen (scripts/ did, until this test)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what is not the project's source: environments, build outputs, run outputs (see .gitignore)
NOT_SOURCE = {"build", "dist", "runs"}


def python_roots() -> set[str]:
    """Top-level folders holding Python files, and Python files at the top level."""
    roots = set()
    for path in ROOT.iterdir():
        if path.name.startswith(".") or path.name in NOT_SOURCE or path.name.endswith(".egg-info"):
            continue
        if (path.is_file() and path.suffix == ".py") or (path.is_dir() and any(path.rglob("*.py"))):
            roots.add(path.name)
    return roots


def lint_paths(command: str) -> set[str]:
    """The paths of the Makefile's ``ruff <command>`` line in the lint target."""
    target = re.search(r"^lint:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.M)
    assert target, "the Makefile has no lint target"
    line = next(line for line in target.group(1).splitlines() if f"ruff {command}" in line)
    return {word for word in line.split(f"ruff {command}", 1)[1].split() if not word.startswith("-")}


def test_make_lint_checks_and_formats_every_python_folder():
    roots = python_roots()
    assert {"python", "kernels", "tests", "scripts"} <= roots  # the walk found the tree
    assert roots - lint_paths("check") == set()
    assert roots - lint_paths("format") == set()
