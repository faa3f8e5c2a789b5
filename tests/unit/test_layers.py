"""The layers of docs/architecture.md hold: imports in gateway/ run downwards only.

Read from the source (every ``import`` and ``from ... import``, the ones under
``TYPE_CHECKING`` and inside functions too), so a new upward import fails
here, not in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top; a module may import from its own layer or a lower one.
LAYERS = [
    # gateway.limits.tenants is the pure parser of config's `tenants:` section
    # (imports nothing of the gateway), so it sits with config.
    ("gateway.config", "gateway.amqp_urls", "gateway.limits.tenants"),
    ("gateway.commands",),
    ("gateway.protocol",),
    ("gateway.auth",),
    ("gateway.telemetry",),
    ("gateway.policy",),
    ("gateway.limits",),
    ("gateway.presence",),
    ("gateway.broker",),
    ("gateway.core",),
    ("gateway.devtools",),
    ("gateway.transports",),
    ("gateway.operations",),
    ("gateway.app",),
    ("gateway.cli",),
]
# The command modules of the parts are gathered by the entry point, and the
# anomaly detector is started by the app: imports from the gateway into
# anomaly/ only from there. gateway/config.py composes the anomaly section
# (anomaly/settings.py, which imports nothing of the gateway).
INTO_ANOMALY = {
    "gateway.cli": {"anomaly.cli"},
    "gateway.app": {"anomaly.service"},
    "gateway.config": {"anomaly.settings"},
    # The alert severities, so their series exist at 0 before the first alert.
    "gateway.telemetry.metrics": {"anomaly.settings"},
}
# Modules kept out of the layers (none now; the Python client left for clients/python).
OUTSIDE: set[str] = set()


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gateway":
                # `from gateway import __version__` is the package itself, not a module.
                found.update(
                    "gateway" if alias.name.startswith("__") else f"gateway.{alias.name}"
                    for alias in node.names
                )
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("gateway", "anomaly")}


def _layer(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def _edges() -> list[tuple[str, str]]:
    edges = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        module = _module(path)
        if module in OUTSIDE:
            continue
        edges.extend((module, target) for target in sorted(_imports(path)))
    return edges


def test_every_gateway_module_has_a_layer() -> None:
    modules = [_module(p) for p in (ROOT / "gateway").rglob("*.py")]
    missing = [m for m in modules if m != "gateway" and m not in OUTSIDE and _layer(m) is None]
    assert missing == []


def test_imports_run_downwards_only() -> None:
    upward = []
    for source, target in _edges():
        if target.startswith("anomaly"):
            if not any(target.startswith(t) for t in INTO_ANOMALY.get(source, ())):
                upward.append(f"{source} -> {target}")
            continue
        if target == "gateway" or target in OUTSIDE:
            continue
        low, high = _layer(target), _layer(source)
        assert low is not None and high is not None, (source, target)
        if low > high:
            upward.append(f"{source} -> {target}")
    assert upward == []


def test_no_import_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "anomaly").rglob("*.py")]:
        graph[_module(path)] = _imports(path)
    # An import of a package counts as one of its __init__ (which import nothing).
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1 and not cycle:
                cycle.extend([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycle == []
