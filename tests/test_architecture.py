"""The shape of the code, checked by walking its imports with `ast`: no import cycle anywhere in
stages/ and flows/ (imports inside functions included), no stage imports another stage or the
pipeline that runs it, and every objective registers from its own file."""

import ast
from pathlib import Path

from conftest import ROOT

STAGES = ("load_prompts", "sample", "annotate", "reweight", "data_pool", "build_pool", "reference", "train", "evaluate")
PACKAGES = ("stages", "flows")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere in it (a `from pkg import name` of a submodule counts)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_no_stage_imports_another_stage_or_the_pipeline():
    g = graph()
    stages = {f"stages.{s}" for s in STAGES}
    for s in sorted(stages):
        bad = g[s] & (stages | {"stages.pipeline.registry", "stages.pipeline.runner"})
        assert not bad, f"{s} imports {sorted(bad)}: stages share services, never each other"


def test_layers_point_one_way():
    """Libraries (services, training, data, annotators) never import a stage or the runner; the
    context module, which every layer may use, imports nothing of ours."""
    g = graph()
    top = {f"stages.{s}" for s in STAGES} | {"stages.pipeline.registry", "stages.pipeline.runner"}
    for mod in sorted(g):
        if mod.split(".")[1:2] and mod.split(".")[1] in ("services", "training", "data", "annotators"):
            bad = g[mod] & top
            assert not bad, f"{mod} imports {sorted(bad)}: a library layer must not depend on the stages"
    # (its one import, the store, is for type hints only: under TYPE_CHECKING)
    assert g["stages.pipeline.context"] <= {"stages.pipeline.store"}, "stages.pipeline.context imports too much"
    loose = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__", "config", *STAGES}
    assert not loose, f"stages/ holds the eight stages and config.py; move {sorted(loose)} into a layer"


def test_the_registry_finds_every_stage_and_objective():
    from stages.training.objectives import OBJECTIVES
    from stages.pipeline.registry import stage_specs

    assert tuple(stage_specs()) == STAGES
    files = {p.stem for p in (ROOT / "stages/training/objectives").glob("*.py")} - {"__init__", "base", "conditioned"}
    modules_of = {cls.__module__.rsplit(".", 1)[1] for cls in OBJECTIVES.values()}
    assert modules_of == files, "each objective file registers exactly its objective"
