"""No function of ``bestie/`` is longer than 80 lines (issue 19: "no function over ~80 lines").

A function's length is counted from its ``def`` line to its last line, **without its docstring** (the
documentation of shapes, units and errors is not what makes a function hard to follow) and with its
comments, blank lines and nested functions. Decorators are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 80
PACKAGE = Path(__file__).resolve().parents[1] / "bestie"

# Functions over the limit allowed for now (none today); each entry must still be over the
# limit (the test fails when it is not, so the list only shrinks).
PENDING: dict[str, str] = {}


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``node`` from ``def`` to its end, minus the lines of its docstring."""
    n = node.end_lineno - node.lineno + 1
    first = node.body[0] if node.body else None
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        n -= first.end_lineno - first.lineno + 1
    return n


def function_lengths(root: Path = PACKAGE) -> dict[str, int]:
    """``{"<path relative to bestie>::<qualified name>": length}`` of every function and method under ``root``."""
    out: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    out[f"{rel}::{name}"] = _length(child)
                    visit(child, f"{name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return out


def test_no_function_over_80_lines():
    lengths = function_lengths()
    assert len(lengths) > 500, "the scan found too few functions: is PACKAGE right?"
    long = {k: n for k, n in lengths.items() if n > MAX_LINES and k not in PENDING}
    assert not long, "functions over %d lines (docstring not counted): %s; split them into named steps" % (
        MAX_LINES, ", ".join(f"{k} ({n})" for k, n in sorted(long.items(), key=lambda kv: -kv[1])))


def test_pending_entries_are_still_long():
    lengths = function_lengths()
    stale = [k for k in PENDING if lengths.get(k, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines (or gone): remove from PENDING: {stale}"


def test_length_counts_code_not_docstring(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(3))
    (tmp_path / "m.py").write_text(f'def f():\n    """Doc\n\n    more doc.\n    """\n{body}\n\n\nclass C:\n'
                                   f'    def g(self):\n        return 1\n', encoding="utf-8")
    assert function_lengths(tmp_path) == {"m.py::f": 4, "m.py::C.g": 2}
