"""The package's import graph: no cycles, arrows pointing down, imports at module level.

Walks every module of `sdjax` with `ast` (module-level and function-level imports alike) and
checks the rules of ARCHITECTURE.md: no import cycle; the lower floors (`models`, `sampling`,
`weights`) import nothing from the generation layer or the entry points; an `sdjax` import
inside a function is allowed only where it keeps `import sdjax` cheap (the package's lazy
`load_pipeline`), so a cycle can never hide behind a local import.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sdjax"

# Function-level `sdjax` imports that are allowed: (module, imported module).
LAZY_ALLOWED = {("sdjax", "sdjax.pipeline"),  # `sdjax.load_pipeline` without importing JAX at `import sdjax`
                ("sdjax.serve", "sdjax.serve.app"),  # FastAPI (the optional extra) only when serving
                ("sdjax.cli_train", "sdjax.train.trainer")}  # orbax (~0.3 s) only when training
LOWER_FLOORS = ("sdjax.models", "sdjax.sampling", "sdjax.weights")
UPPER_FLOORS = ("sdjax.pipeline", "sdjax.cli", "sdjax.cli_networks", "sdjax.cli_sdxl", "sdjax.cli_train", "sdjax.train",
                "sdjax.serve")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, current: str, is_package: bool, level: int) -> str:
    if level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        name = ".".join(base + ([name] if name else []))
    return name


def _imports(module: str) -> list[tuple[str, bool]]:
    """[(imported sdjax module, at function level)] of one module; `from pkg import sub` counts
    as importing `pkg.sub` when that is a module, else `pkg`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    # Module-level: statements directly in the module body, or in its top-level if/try blocks.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node) if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", module, path.name == "__init__.py", node.level)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import sdjax.x.y` of a non-module attribute
                name = name.rpartition(".")[0]
            if name.startswith("sdjax") and name in MODULES and name != module:
                out.append((name, id(node) not in top))
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_walk_sees_the_package():
    assert {"sdjax", "sdjax.pipeline.core", "sdjax.pipeline.load", "sdjax.cli"} <= set(MODULES)
    assert ("sdjax.pipeline.core", False) in GRAPH["sdjax.pipeline.generator"]


def test_no_import_cycles():
    # A package's __init__ runs before its submodules, so `pkg.sub -> pkg` is not an edge of the
    # module's own making; every written import is.
    edges = {m: {n for n, _ in imps if n not in _parents(m)} for m, imps in GRAPH.items()}
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_level_sdjax_imports():
    local = sorted((m, n) for m, imps in GRAPH.items() for n, lazy in imps if lazy and (m, n) not in LAZY_ALLOWED)
    assert not local, f"function-level sdjax imports (hoist them; a cycle must not hide behind one): {local}"


def test_lower_floors_do_not_import_the_generation_layer_or_entry_points():
    bad = [(m, n) for m, imps in GRAPH.items() if m.startswith(LOWER_FLOORS)
           for n, _ in imps if n.startswith(UPPER_FLOORS)]
    assert not bad, f"a lower floor imports from above it: {bad}"


def test_the_pipeline_core_knows_nothing_above_it():
    above = ("sdjax.pipeline.generator", "sdjax.pipeline.load", "sdjax.pipeline.control", "sdjax.pipeline.request",
             "sdjax.pipeline.batch", "sdjax.cli")
    bad = [n for n, _ in GRAPH["sdjax.pipeline.core"] if n.startswith(above)]
    assert not bad, f"sdjax.pipeline.core imports {bad}"


def test_the_runtime_package_holds_no_benchmark():
    assert not [m for m in MODULES if "bench" in m.rpartition(".")[2]]


def test_models_know_no_files_and_samplers_see_only_a_denoiser():
    models = [(m, n) for m, imps in GRAPH.items() if m.startswith("sdjax.models")
              for n, _ in imps if not n.startswith(("sdjax.models", "sdjax.errors"))]
    assert not models, f"models import outside sdjax.models: {models}"
    samplers = [(m, n) for m, imps in GRAPH.items() if m.startswith("sdjax.sampling")
                for n, _ in imps if n.startswith(("sdjax.models", "sdjax.weights"))]
    assert not samplers, f"sampling imports models or weights: {samplers}"


def test_the_generation_layer_knows_no_entry_point():
    """sdjax.pipeline serves the CLI and the server alike and imports neither."""
    bad = [(m, n) for m, imps in GRAPH.items() if m.startswith("sdjax.pipeline")
           for n, _ in imps if n.startswith(("sdjax.serve", "sdjax.cli"))]
    assert not bad, f"the generation layer imports an entry point: {bad}"
