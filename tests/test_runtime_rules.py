"""Rules the generator's code keeps, checked on its source: no module-level mutable state.

A module of runtime/ binds only immutable values at module level (tuple, frozenset, types.MappingProxyType,
numbers, strings, frozen objects) and has no `global` statement, so everything a run depends on is passed in
at construction (RuntimeOptions, the Layout, the Attention object, the Sampling) and nothing one run or test
sets can leak into the next. functools.cache on a pure function is the one cache allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
MUTABLE_DISPLAYS = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
MUTABLE_CALLS = frozenset({"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque", "bytearray"})


def _mutable(value: ast.expr) -> bool:
    """A mutable container: a dict/list/set display or comprehension, or a call that builds one; a tuple of
    values is mutable when any of them is."""
    if isinstance(value, MUTABLE_DISPLAYS):
        return True
    if isinstance(value, ast.Tuple):
        return any(_mutable(element) for element in value.elts)
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        return name in MUTABLE_CALLS
    return False


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run at import: the module's own, and those inside its if/try/with blocks (not the
    bodies of functions and classes)."""
    found = []
    for node in body:
        found.append(node)
        if isinstance(node, ast.If | ast.With):
            found += _module_level(node.body) + _module_level(getattr(node, "orelse", []))
        elif isinstance(node, ast.Try):
            found += _module_level(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                found += _module_level(handler.body)
    return found


def mutable_state(source: str) -> list[str]:
    """'line N: ...' for each `global` statement and each module-level binding of a mutable container."""
    tree = ast.parse(source)
    found = [(node.lineno, f"global {', '.join(node.names)}")
             for node in ast.walk(tree) if isinstance(node, ast.Global)]
    for node in _module_level(tree.body):
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign) else None
        if value is not None and _mutable(value):
            found.append((node.lineno, ast.unparse(node).split("\n")[0][:100]))
    return [f"line {line}: {text}" for line, text in sorted(found)]


PLANTED = '''
import collections
from types import MappingProxyType

CACHE = {}
SEEN: list[int] = []
NAMES = {name for name in "ab"}
TABLE = dict(a=1)
BY_KEY = collections.defaultdict(list)
PAIR = ((), [])
try:
    import missing
except ImportError:
    FALLBACKS = ["sdpa"]
FROZEN = MappingProxyType({"a": 1})
KINDS = frozenset({"a"})
ORDER = ("a", "b")


def remember(value):
    global CACHE
    local = {value: []}
    CACHE = local


class Kept:
    per_class = {}
'''


def test_the_rule_finds_a_global_statement_and_every_mutable_module_binding_and_nothing_else():
    assert mutable_state(PLANTED) == [
        "line 5: CACHE = {}",
        "line 6: SEEN: list[int] = []",
        "line 7: NAMES = {name for name in 'ab'}",
        "line 8: TABLE = dict(a=1)",
        "line 9: BY_KEY = collections.defaultdict(list)",
        "line 10: PAIR = ((), [])",
        "line 14: FALLBACKS = ['sdpa']",
        "line 21: global CACHE",
    ]


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: str(p.relative_to(RUNTIME)))
def test_no_runtime_module_keeps_mutable_state_at_module_level(path):
    assert mutable_state(path.read_text(encoding="utf-8")) == [], (
        f"{path.relative_to(RUNTIME.parent)}: bind an immutable value (tuple, frozenset, MappingProxyType) or pass "
        "the state in at construction")
