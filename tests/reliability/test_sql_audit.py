"""SQL is built only from files and bound parameters: a statement put together in Python
(f-string, ``%``, ``.format``, ``+``) may only interpolate identifiers from closed sets or
constants, and each such place carries ``# noqa: S608`` as the mark of that audit."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tutor_scoring_dagster"

SINKS = {
    "execute": 0,
    "executemany": 0,
    "exec_driver_sql": 0,
    "sql": 0,
    "copy": 0,
    "text": 0,
    "query_frame": 1,
    "fetch_one": 1,
}
"""Callables that run (or wrap) SQL, and which positional argument is the statement."""
AUDITED = "noqa: S608"


def _dynamic(node: ast.AST, assigned: dict[str, list[ast.Assign]], depth: int = 0) -> bool:
    """Text built at run time from something other than literals (names are followed to
    their assignments in the same scope; a parameter or an unknown name counts as input)."""
    if isinstance(node, ast.Constant):
        return False
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _dynamic(node.left, assigned, depth) or _dynamic(node.right, assigned, depth)
    if isinstance(node, ast.Name):
        values = [a.value for a in assigned.get(node.id, [])]
        if not values or depth > 3:
            return True
        return any(_dynamic(v, assigned, depth + 1) for v in values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("format", "join") and isinstance(
            node.func.value, ast.Constant | ast.JoinedStr
        )
    return False


def _sink(call: ast.Call) -> ast.AST | None:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in SINKS:
        return None
    index = SINKS[name]
    if len(call.args) > index:
        return call.args[index]
    for kw in call.keywords:
        if kw.arg in ("sql", "query", "statement"):
            return kw.value
    return None


def _lines(source: list[str], node: ast.AST) -> str:
    start = getattr(node, "lineno", 1)
    end = getattr(node, "end_lineno", start) or start
    return "\n".join(source[start - 1 : end])


def built_sql() -> tuple[list[str], list[str]]:
    """Places SQL is built in Python: (audited, not audited), as ``file:line: code``."""
    found: list[str] = []
    audited: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        source = text.splitlines()
        tree = ast.parse(text)
        for scope in ast.walk(tree):
            if not isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Module):
                continue
            assigned: dict[str, list[ast.Assign]] = {}
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            assigned.setdefault(target.id, []).append(node)
            for node in ast.walk(scope):
                if not isinstance(node, ast.Call) or (arg := _sink(node)) is None:
                    continue
                origins: list[ast.AST] = []
                if isinstance(arg, ast.Name):
                    # A statement in a variable: where it was built (a parameter is the
                    # caller's business: the caller's own call is checked where it is built).
                    origins = [a for a in assigned.get(arg.id, []) if _dynamic(a.value, assigned)]
                elif _dynamic(arg, assigned):
                    origins = [node]
                for origin in origins:
                    rel = path.relative_to(PACKAGE.parent)
                    first = _lines(source, origin).strip().splitlines()[0]
                    ok = AUDITED in _lines(source, node) + _lines(source, origin)
                    (audited if ok else found).append(f"{rel}:{origin.lineno}: {first}")
    return sorted(set(audited)), sorted(set(found))


def test_the_audit_sees_the_annotated_identifier_cases() -> None:
    """The check does find SQL built in Python (a blind check would pass the test below):
    the audited identifier cases of ingest and the warehouse are among what it sees."""
    audited, _ = built_sql()
    assert any(a.startswith("tutor_scoring_dagster/ingest.py") for a in audited), audited
    assert sum(a.startswith("tutor_scoring_dagster/warehouse.py") for a in audited) >= 3


def test_sql_is_built_only_from_bound_parameters_or_audited_identifiers() -> None:
    _, problems = built_sql()
    assert not problems, "SQL built in Python without `# noqa: S608`:\n" + "\n".join(problems)
