"""The house plan: imports inside ``mlora/`` point only down the layers and form no circle.

Every module under ``mlora/`` is parsed with ``ast`` (top-level imports, imports inside
functions and ``TYPE_CHECKING`` blocks alike: a lazy import is still an arrow). Its layer is its
folder: ``LAYERS`` lists the folders of ``mlora/``, lowest first, and a test keeps the table and
the tree equal. A module may import its own layer or lower ones; the import graph must have
no circle; no module imports another module's private (``_name``) attribute. ``ALLOWED`` lists
the arrows that break these rules today, each with the reason it is still there; the test also
fails when an allowed arrow is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlora"

# Lowest layer first. Each layer is a folder of ``mlora/`` (``mlora/core/``, ...) except the two
# modules at the top of the package: ``api`` (mlora/api.py, the library entry points) and
# ``mlora`` itself (mlora/__init__.py, the public names). A module's layer is its folder.
LAYERS: list[str] = [
    "core",  # errors, JSON reading, atomic/background writes, file checks, hub, stderr, Ctrl-C
    "hardware",  # backends (CUDA, MPS, CPU), dtypes
    "config",  # the config's keys and checks, adapter names, upstream m-LoRA keys
    "data",  # prompt templates, rows, evaluation tasks
    "ops",  # tensor code, no mlora state
    "batching",  # the packed batch's layout, random streams, side losses, dispatcher, collation
    "adapters",  # LoRA/DoRA layers and the MoE kinds (MixLoRA, LoRAMoE/MoLA, MeteoRA)
    "model",  # the base model and MultiLoraModel
    "persistence",  # adapters on disk (PEFT format), through the registry of kinds (adapters/)
    "training",  # trainer, optimizers, recomputation, distributed, preflight, checkpoints
    "inference",  # loading trained adapters, generation, evaluation
    "sweep",  # Optuna sweeps: trials entering and leaving the trainer, their outputs
    "api",  # mlora/api.py
    "cli",  # the command lines
    "mlora",  # mlora/__init__.py
]
# Modules that sit directly in mlora/ rather than in a layer's folder: each is a layer of its own.
TOP_MODULES = {"mlora": "mlora", "mlora.api": "api"}

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
                if submodule in modules:  # ``from mlora.adapters.mixlora import persistence``
                    found.setdefault(submodule, set())
                else:
                    found.setdefault(target, set()).add(alias.name)
    found.pop(name, None)
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of ``module``'s folder (or of the top module it is)."""
    parts = module.split(".")
    in_folder = len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir())
    layer = TOP_MODULES.get(module) or (parts[1] if in_folder else None)
    assert layer in LAYERS, (
        f"{module} is in no layer of LAYERS: place it in the folder of its layer "
        "(only mlora/__init__.py and mlora/api.py sit directly in mlora/)"
    )
    return LAYERS.index(layer)


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


def test_the_folders_are_the_layers() -> None:
    """The tree and the table cannot drift: every folder holding code is a layer of LAYERS, every
    layer's folder is a package, and no module besides the top ones sits directly in mlora/."""
    top = {PACKAGE / (module.partition(".")[2] or "__init__") for module in TOP_MODULES}
    loose = [p.name for p in PACKAGE.glob("*.py") if p.with_suffix("") not in top]
    assert not loose, f"modules directly in mlora/, move each into its layer's folder: {loose}"
    folders = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.glob("*/**/*.py")}
    assert folders <= set(LAYERS), f"folders that are no layer: {sorted(folders - set(LAYERS))}"
    missing = [f for f in LAYERS if f not in TOP_MODULES.values() and f not in folders]
    assert not missing, f"layers without a folder: {missing}"
    for folder in folders:
        assert (PACKAGE / folder / "__init__.py").is_file(), f"mlora/{folder}/ is not a package"


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
    assert layer_of("mlora.config.schema") < layer_of("mlora.training.trainer")
    assert layer_of("mlora.adapters.mixlora.spec") == layer_of("mlora.adapters.lora")
    assert layer_of("mlora.core") == layer_of("mlora.core.errors") == 0
    assert layer_of("mlora.api") < layer_of("mlora.cli.train") < layer_of("mlora")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("mlora.a_module_nobody_placed")
