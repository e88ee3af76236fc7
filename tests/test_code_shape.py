"""The shape limits of the code, counted on its syntax tree: no function longer than 60 lines in
restorer/, shard_tools/ and launch/ (80 in bench/, whose scripts print tables), and none with more
than 6 parameters in restorer/ (``self`` / ``cls`` not counted; ``*args`` and ``**kwargs`` count as
one each). A function's length runs from its ``def`` line to the end of its last statement,
decorators not counted; a nested function counts in the function that holds it, and on its own.

Speed: ``ast.parse`` of the ~90 files takes ~0.75 s of CPU, so the files are first compiled to code
objects (~0.3 s), which give every function's parameters exactly and its extent from its first
decorator (or ``def``) to its last instruction: never shorter than the syntax tree's count here
(every statement keeps a line in the code, ``pass`` and constants as NOPs). Only a file with a
function over a limit by that count is parsed, and the syntax tree decides and reports.
"""

from __future__ import annotations

import ast
import inspect
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = {"restorer": 60, "shard_tools": 60, "launch": 60, "bench": 80}
MAX_PARAMS = {"restorer": 6}
FUNCTION = inspect.CO_OPTIMIZED | inspect.CO_NEWLOCALS  # set on functions, not on class or module bodies


def length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return len([n for n in names if n not in ("self", "cls")])


def code_shapes(code: types.CodeType) -> list[tuple[int, int]]:
    """(lines from the first decorator or ``def`` to the last instruction, parameters) of every
    function under ``code``; its nested functions' lines count in it."""
    found: list[tuple[int, int]] = []

    def last_line(c: types.CodeType) -> int:
        last = max((end for _, end, _, _ in c.co_positions() if end is not None), default=c.co_firstlineno)
        for k in c.co_consts:
            if isinstance(k, types.CodeType):
                last = max(last, last_line(k))
        if c.co_flags & FUNCTION == FUNCTION and not c.co_name.startswith("<"):  # not lambdas, comprehensions
            n = c.co_argcount + c.co_kwonlyargcount
            n += bool(c.co_flags & inspect.CO_VARARGS) + bool(c.co_flags & inspect.CO_VARKEYWORDS)
            n -= bool(c.co_argcount and c.co_varnames[0] in ("self", "cls"))
            found.append((last - c.co_firstlineno + 1, n))
        return last

    last_line(code)
    return found


def tree_over(path: Path, max_lines: int, max_params: int | None) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            where = f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
            if length(node) > max_lines:
                found.append(f"{where}: {length(node)} lines (limit {max_lines})")
            if max_params is not None and parameters(node) > max_params:
                found.append(f"{where}: {parameters(node)} parameters (limit {max_params})")
    return found


def over_limits(root: str) -> list[str]:
    max_lines, max_params = MAX_LINES[root], MAX_PARAMS.get(root)
    found = []
    for path in sorted((REPO / root).rglob("*.py")):
        if hasattr(types.CodeType, "co_positions"):  # Python >= 3.11: the quick pass first
            code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
            shapes = code_shapes(code)
            if all(lines <= max_lines and (max_params is None or n <= max_params) for lines, n in shapes):
                continue
        found += tree_over(path, max_lines, max_params)
    return found


@pytest.mark.parametrize("root", ["restorer", "shard_tools", "launch", "bench"])
def test_functions_within_limits(root):
    found = over_limits(root)
    assert not found, f"{len(found)} over the limits:\n" + "\n".join(found)


SAMPLE = '''
import functools


class A:
    @functools.cache
    def f(self, a, b=1, /, *c, d, **e):
        x = 1

        def g():
            return [y for y in range(3)]

        if x:
            pass
        return (
            x
        )

    @classmethod
    def h(cls, a, b, c, d, e, f, g):
        """Doc."""
        ...
'''


def test_the_count_sees_what_it_counts():
    tree = ast.parse(SAMPLE)
    f, g, h = sorted((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)), key=lambda n: n.lineno)
    assert [(length(n), parameters(n)) for n in (f, g, h)] == [(11, 5), (2, 0), (3, 7)]
    if sys.version_info >= (3, 11):
        quick = sorted(code_shapes(compile(SAMPLE, "sample", "exec", dont_inherit=True)))
        assert quick == sorted([(12, 5), (2, 0), (4, 7)])  # the decorator's line more: never fewer
