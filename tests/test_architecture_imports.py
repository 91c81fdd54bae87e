"""The house plan: imports inside ``mlora/`` point only down the layers and form no circle.

Every module under ``mlora/`` is parsed with ``ast`` (top-level imports, imports inside
functions and ``TYPE_CHECKING`` blocks alike: a lazy import is still an arrow) and placed in one
layer of ``LAYERS``. A module may import its own layer or lower ones; the import graph must have
no circle; no module imports another module's private (``_name``) attribute. ``ALLOWED`` lists
the arrows that break these rules today, each with the reason it is still there; the test also
fails when an allowed arrow is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlora"

# Lowest layer first. A module belongs to the entry that names it or, failing that, the longest
# entry naming a package above it ("mlora" itself names only mlora/__init__.py).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "mlora.errors",
            "mlora.jsonfile",
            "mlora.atomic",
            "mlora.integrity",
            "mlora.adapter_names",
            "mlora.hub",
            "mlora.stderr_log",
            "mlora.interrupt",
            "mlora.upstream",
            "mlora.background",
        ),
    ),
    ("hardware", ("mlora.backends", "mlora.precision")),
    ("config", ("mlora.config",)),
    ("data", ("mlora.prompts", "mlora.data", "mlora.eval_tasks")),
    ("ops", ("mlora.ops", "mlora.varlen_attention")),  # tensor code, no mlora state
    (
        "batching",
        (
            "mlora.randomness",
            "mlora.aux_losses",
            "mlora.layout",
            "mlora.dispatcher",
            "mlora.batch",
            "mlora.packing",
        ),
    ),
    ("adapters", ("mlora.adapters", "mlora.moe", "mlora.linear_moe", "mlora.meteora")),
    ("model", ("mlora.base_model", "mlora.model", "mlora.demo_model")),
    (
        "persistence",
        (
            "mlora.adapter_tensors",
            "mlora.peft_files",
            "mlora.lora_persistence",
            "mlora.moe.persistence",
            "mlora.linear_moe_persistence",
            "mlora.meteora_persistence",
            "mlora.adapter_kinds",
            "mlora.persistence",
        ),
    ),
    (
        "training",
        (
            "mlora.optim",
            "mlora.checkpointing",
            "mlora.distributed",
            "mlora.preflight",
            "mlora.run_records",
            "mlora.checkpoint",
            "mlora.trainer",
        ),
    ),
    (
        "inference",
        (
            "mlora.loading",
            "mlora.generation",
            "mlora.trained",
            "mlora.inference",
            "mlora.evaluation",
        ),
    ),
    ("api", ("mlora.api",)),
    (
        "cli",
        (
            "mlora.cli_common",
            "mlora.cli",
            "mlora.launch",
            "mlora.generate_cli",
            "mlora.interactive",
            "mlora.webui",
        ),
    ),
    ("package", ("mlora",)),
]

# (importer, imported): arrows that would break the plan, with the reason; empty, and the test
# below keeps it from holding arrows that no longer exist.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, set[str]]:
    """{imported module: names taken from it} for every ``mlora`` import anywhere in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mlora":
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mlora":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:  # ``from mlora.moe import persistence``
                    found.setdefault(submodule, set())
                else:
                    found.setdefault(target, set()).add(alias.name)
    found.pop(name, None)
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer index): the longest prefix wins
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            inside = module == member or (member != "mlora" and module.startswith(member + "."))
            if inside and (best is None or len(member) > best[0]):
                best = (len(member), index)
    assert best is not None, f"{module} is in no layer of LAYERS: place it"
    return best[1]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``edges`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_every_module_has_a_layer() -> None:
    for module in all_modules():
        layer_of(module)


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
        f"({LAYERS[layer_of(imported)][0]})"
        for importer, targets in import_graph().items()
        for imported in targets
        if layer_of(imported) > layer_of(importer) and (importer, imported) not in ALLOWED
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle() -> None:
    edges = {
        importer: {t for t in targets if (importer, t) not in ALLOWED}
        for importer, targets in import_graph().items()
    }
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_private_names_imported_across_modules() -> None:
    private = [
        f"{importer} imports {imported}.{name}"
        for importer, targets in import_graph().items()
        for imported, names in targets.items()
        for name in sorted(names)
        if name.startswith("_") and (importer, imported) not in ALLOWED
    ]
    assert not private, "\n".join(private)


def test_allowlist_only_names_arrows_that_exist() -> None:
    graph = import_graph()
    stale = [f"{a} -> {b}" for a, b in ALLOWED if b not in graph.get(a, {})]
    assert not stale, "remove from ALLOWED: " + ", ".join(stale)


def test_the_checker_sees_circles_and_upward_arrows() -> None:
    """The helpers themselves, on a hand-made graph: a circle and an upward arrow are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("mlora.config") < layer_of("mlora.trainer")
    assert layer_of("mlora.moe.spec") == layer_of("mlora.adapters.lora")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("mlora.a_module_nobody_placed")
