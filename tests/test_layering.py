"""The trainer's modules depend on each other one way (docs/design.md, "Layout"): read from their import
statements, so a new import that turns an arrow around fails here, not in a reader's head."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gcpo_fast"


def module_imports(top_level_only: bool) -> dict[str, set[str]]:
    """{module: the gcpo_fast modules it imports} for every module of gcpo_fast/ (kernels counted as one)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        names = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gcpo_fast"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    names.add(parts[1])
                else:  # from gcpo_fast import groups, parallel
                    names.update(alias.name for alias in node.names)
        graph[path.stem] = names - {path.stem, "__init__"}
    return graph


def test_nothing_imports_the_loop_and_only_the_run_imports_the_config():
    graph = module_imports(top_level_only=False)
    assert not [m for m, deps in graph.items() if "train" in deps]
    assert sorted(m for m, deps in graph.items() if "config" in deps) == ["prepare", "train"]


def test_a_round_and_a_step_never_import_each_other_nor_the_engine_the_update():
    graph = module_imports(top_level_only=False)
    assert "update" not in graph["rounds"] and "rounds" not in graph["update"]
    assert "update" not in graph["rollout"] and "rounds" not in graph["rollout"]


def test_module_level_imports_have_no_cycle():
    """Lazy imports inside functions (the vLLM engine, a command's own main) may point back; the module graph
    that an import walks may not."""
    graph = module_imports(top_level_only=True)
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
