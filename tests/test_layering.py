"""The trainer's wings depend on each other one way (docs/design.md, "Layout"), read from every import statement of
every file under gcpo_fast/ (function-level imports included), so a new import that turns an arrow around fails
here, not in a reader's head."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gcpo_fast"

# Each top-level module or subpackage ("wing") and its layer: a file may import its own wing and lower layers only.
LAYER = {
    "errors": 0,
    "kernels": 0,  # the fused ops: nothing of the trainer (test below)
    "options": 1,
    "cli": 1,
    "data": 2,  # datasets, tasks, prompts, rewards: no model
    "distributed": 2,
    "methods": 2,  # advantages and recipes: tensors only
    "run": 3,  # state, checkpoints, lock, logging, timing
    "models": 4,
    "engines": 5,
    "packing": 5,
    "scoring": 6,
    "tools": 6,  # the sandbox, the tool formats, the multi-turn loop around an engine
    "golden": 7,
    "rounds": 8,
    "update": 8,
    "async_rollouts": 9,
    "eval": 9,
    "config": 10,
    "prepare": 11,
    "serve_options": 11,  # the generation server's command line, checked before any model
    "train": 12,  # the commands and the integrations on top
    "serve": 12,
    "lora": 12,
    "make_default_model": 12,
    "integrations": 12,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")} | {"gcpo_fast.kernels": ROOT / "kernels/__init__.py"}


def resolve(name: str) -> str:
    """The module an imported name lives in (`gcpo_fast.run.lock` for `from gcpo_fast.run import lock`)."""
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def imports(path: Path) -> set[str]:
    """The gcpo_fast modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gcpo_fast"):
            found |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("gcpo_fast")}
    return found - {"gcpo_fast"}


def wing(module: str) -> str:
    return module.split(".")[1]


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items() if not m.startswith("gcpo_fast.kernels")}


def test_every_file_belongs_to_a_wing_with_a_layer_and_every_wing_says_its_job():
    assert {wing(m) for m in MODULES if m != "gcpo_fast"} == set(LAYER)
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"{folder.name}/__init__.py needs a docstring naming the wing's job"


def test_no_import_from_a_lower_layer_up():
    upward = [
        f"{m} -> {d}"
        for m, deps in GRAPH.items()
        for d in deps
        if wing(d) != wing(m) and LAYER[wing(d)] >= LAYER[wing(m)]
    ]
    assert not upward, upward


def test_the_wings_rules():
    def reaches(prefix: str, *forbidden: str) -> list[str]:
        return [
            f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith(prefix) for d in deps if wing(d) in forbidden
        ]

    assert not reaches("gcpo_fast.engines", "rounds", "update", "golden", "methods", "train", "config", "tools")
    assert not reaches("gcpo_fast.tools", "rounds", "update", "golden", "methods", "models", "packing", "scoring")
    assert not reaches("gcpo_fast.data", "models", "engines", "packing", "scoring", "distributed", "run")
    assert not reaches("gcpo_fast.methods", "models", "engines", "data", "golden")
    assert not [m for m, deps in GRAPH.items() if "gcpo_fast.train" in deps]  # nothing imports the loop
    assert sorted(m for m, deps in GRAPH.items() if "gcpo_fast.config" in deps) == [
        "gcpo_fast.prepare",
        "gcpo_fast.train",
    ]  # only the run's entry reads the composed options
    assert "gcpo_fast.update" not in GRAPH["gcpo_fast.rounds"] and "gcpo_fast.rounds" not in GRAPH["gcpo_fast.update"]


def test_the_kernels_import_nothing_of_the_trainer():
    for path in (ROOT / "kernels").glob("*.py"):
        outside = {d for d in imports(path) if not d.startswith("gcpo_fast.kernels")}
        assert not outside, f"kernels/{path.name} imports {outside}"


def test_no_import_cycle_anywhere():
    """Function-level imports included: a lazy import that points back is still a cycle for a reader."""
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(GRAPH.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
