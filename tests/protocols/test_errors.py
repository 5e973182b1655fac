"""The coded error tree: every EdgefleetError has its own stable code, and the
tree drawn in ``edgefleet.protocols.errors`` is the tree in the code.

Codes cross the wire (agent reports, events) and appear in ``--json`` output,
so a class that silently inherits its parent's code, or a drawing that no
longer matches the classes, is a bug a reader cannot see. These tests import
every module of the package, so a class added anywhere is checked too.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from types import ModuleType

import pytest

import edgefleet.agent
import edgefleet.controller
import edgefleet.protocols
import edgefleet.shared
from edgefleet.protocols import errors as protocol_errors
from edgefleet.protocols.errors import EdgefleetError

# The one code two classes share on purpose: both mean "no such thing" (a file
# the repository does not have, a registry lookup that found nothing), on
# different sides. Any other shared code is a mistake.
SHARED_CODES = {"not_found": {"FileNotFoundOnServerError", "NotFoundError"}}

# env.py runs the migrations when imported; the revision scripts define no errors.
SKIP_PREFIXES = ("edgefleet.controller.registry.migrations.",)

CODE = re.compile(r"^[a-z][a-z0-9_]*$")
# A tree line: box-drawing prefix, class name, quoted code, optional [module].
TREE_LINE = re.compile(
    r'^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w*Error)\s+"(?P<code>[^"]+)"'
    r"(?:.*\[(?P<module>[\w.]+)\])?"
)


def _import_all() -> list[ModuleType]:
    modules: list[ModuleType] = []
    failures: list[str] = []
    for package in (edgefleet.protocols, edgefleet.shared, edgefleet.agent, edgefleet.controller):
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.startswith(SKIP_PREFIXES):
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception as exc:  # report every module that fails, not just the first
                failures.append(f"{info.name}: {type(exc).__name__}: {exc}")
    assert not failures, "modules that cannot be imported:\n" + "\n".join(failures)
    return modules


def _subclasses(cls: type[EdgefleetError]) -> set[type[EdgefleetError]]:
    found: set[type[EdgefleetError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


@pytest.fixture(scope="module")
def classes() -> dict[str, type[EdgefleetError]]:
    """Every EdgefleetError class defined in the package, by name."""
    _import_all()
    ours = [EdgefleetError] + [
        c for c in _subclasses(EdgefleetError) if c.__module__.startswith("edgefleet.")
    ]
    by_name: dict[str, type[EdgefleetError]] = {}
    for cls in ours:
        other = by_name.setdefault(cls.__name__, cls)
        assert other is cls, f"two error classes named {cls.__name__}: {other!r}, {cls!r}"
    return by_name


@dataclass(frozen=True)
class Drawn:
    name: str
    code: str
    parent: str | None
    module: str


def _tree(doc: str, root_module: str) -> list[Drawn]:
    """The classes a docstring draws, with the parent each is drawn under."""
    drawn: list[Drawn] = []
    stack: list[tuple[int, Drawn]] = []  # (column, entry) of the open ancestors
    for line in doc.splitlines():
        match = TREE_LINE.match(line)
        if match is None:
            continue
        column = len(match["indent"])
        while stack and stack[-1][0] >= column:
            stack.pop()
        parent = stack[-1][1] if stack else None
        module = (
            "edgefleet." + match["module"]
            if match["module"]
            else parent.module
            if parent
            else root_module
        )
        entry = Drawn(match["name"], match["code"], parent.name if parent else None, module)
        drawn.append(entry)
        stack.append((column, entry))
    return drawn


def test_the_walk_finds_classes_of_every_side(classes: dict[str, type[EdgefleetError]]) -> None:
    modules = {c.__module__ for c in classes.values()}
    for side in ("protocols", "agent", "controller"):
        assert any(m.startswith(f"edgefleet.{side}.") for m in modules), side
    assert {"SlotError", "InvalidNameError", "ReportFormatError", "CertificateError"} <= set(
        classes
    )


def test_every_class_defines_its_own_code(classes: dict[str, type[EdgefleetError]]) -> None:
    inherited = [n for n, c in classes.items() if "code" not in vars(c)]
    assert not inherited, f"classes that inherit their parent's code: {sorted(inherited)}"
    malformed = {n: c.code for n, c in classes.items() if not CODE.match(c.code)}
    assert not malformed, f"codes must be lower_snake_case: {malformed}"
    assert EdgefleetError.code == "error"


def test_codes_are_unique_but_for_the_documented_one(
    classes: dict[str, type[EdgefleetError]],
) -> None:
    by_code: dict[str, set[str]] = {}
    for name, cls in classes.items():
        by_code.setdefault(cls.code, set()).add(name)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert shared == SHARED_CODES


def test_the_drawn_tree_is_the_class_tree(classes: dict[str, type[EdgefleetError]]) -> None:
    assert protocol_errors.__doc__ is not None
    drawn = _tree(protocol_errors.__doc__, "edgefleet.protocols.errors")
    assert drawn, "protocols/errors.py draws no tree"

    unknown = {d.name for d in drawn} - set(classes)
    assert not unknown, f"drawn but not defined: {sorted(unknown)}"
    missing = set(classes) - {d.name for d in drawn}
    assert not missing, f"defined but not drawn in protocols/errors.py: {sorted(missing)}"

    edges = set()
    for d in drawn:
        cls = classes[d.name]
        assert d.code == cls.code, f"{d.name} is drawn with code {d.code!r}, has {cls.code!r}"
        where = cls.__module__
        assert where == d.module, f"{d.name} lives in {where}, drawn in {d.module}"
        if d.parent is None:
            assert cls is EdgefleetError
            continue
        assert classes[d.parent] in cls.__bases__, f"{d.name} is drawn under {d.parent}"
        edges.add((d.name, d.parent))

    # Every edgefleet base of every class is drawn (a class with two is drawn twice).
    for name, cls in classes.items():
        for base in cls.__bases__:
            if issubclass(base, EdgefleetError):
                assert (name, base.__name__) in edges, f"{name} is not drawn under {base.__name__}"


@pytest.mark.parametrize(
    "module",
    [
        "edgefleet.controller.errors",
        "edgefleet.controller.rollout.errors",
        "edgefleet.controller.compiler.errors",
    ],
)
def test_partial_trees_name_the_right_codes(
    module: str, classes: dict[str, type[EdgefleetError]]
) -> None:
    doc = importlib.import_module(module).__doc__
    assert doc is not None
    drawn = _tree(doc, module)
    assert drawn, f"{module} draws no codes"
    for d in drawn:
        assert d.name in classes, f"{module} draws {d.name}, which does not exist"
        assert classes[d.name].code == d.code, f"{module} draws {d.name} as {d.code!r}"
