"""The layer around the model keeps one owner per job: these fail when a second one
appears (a run directory's file names, MLflow writes, the project's settings)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lines(pattern: re.Pattern, allowed: set[str]) -> list[str]:
    """`path:line: text` for each line of the packages' code matching `pattern`, outside
    the `allowed` files (relative paths)."""
    return [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in ("ttt", "sweeps", "analysis")
        for path in sorted((ROOT / package).rglob("*.py"))
        if str(path.relative_to(ROOT)) not in allowed
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]


def test_mlflow_is_written_by_one_class():
    """Every MLflow record is written through `ttt.tracking.tracker.MlflowRun`: no other
    module creates, logs to, tags or ends a run with the client directly (the client's
    log_artifact names the run and `artifact_path`; the tracker's does not)."""
    writes = re.compile(
        r"\.(create_run|log_batch|log_metric|log_param|set_tag|set_terminated|update_run)\("
        r"|\.log_artifact\(.*artifact_path="
    )
    offenders = _lines(writes, {"ttt/tracking/tracker.py"})
    assert not offenders, "\n".join(offenders)


def test_a_run_directory_is_spelled_by_rundir_alone():
    """The record files by name, and the folders joined onto a path (`run / "eval"`)."""
    names = re.compile(
        r"[\"'](run\.json|config\.yaml|metrics\.jsonl)[\"']|/\s*[\"'](checkpoints|eval)[\"/']"
    )
    offenders = _lines(names, {"ttt/rundir.py"})
    assert not offenders, "\n".join(offenders)


def test_the_projects_environment_is_read_in_one_place():
    reads = re.compile(r"environ(\.get)?[\[(][\"']TTT_|getenv\([\"']TTT_")
    offenders = _lines(reads, {"ttt/settings.py"})
    assert not offenders, "\n".join(offenders)
    readme = (ROOT / "README.md").read_text()
    from ttt.settings import Settings

    documented = set(re.findall(r"`(TTT_[A-Z_]+)`", readme))
    fields = {f"TTT_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert fields <= documented, fields - documented


PACKAGES = ("ttt", "sweeps", "analysis")


def _modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its own)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: dict) -> list[tuple[str, int]]:
    """(project module, line) of each import in a module, at any depth (a function's
    imports are dependencies too), leaving out `if TYPE_CHECKING:` blocks. `from a import
    b` names module `a.b` when that is a module, else `a`."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package the module is in
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                module = ".".join(here[: len(here) - node.level + 1] + ([module] if module else []))
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((sub if sub in known else module, node.lineno))
    return [(m, line) for m, line in found if m in known and m != name]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    known = _modules()
    graph, lines = {}, {}
    for name, path in known.items():
        edges = _imports(name, path, known)
        graph[name] = {m for m, _ in edges}
        for m, line in edges:
            lines.setdefault((name, m), line)
    return graph, lines


def test_no_import_cycle_among_the_projects_modules():
    """Computed from the code's own imports (any depth): a cycle is named with the line of
    each import in it."""
    graph, lines = _graph()
    cycles = _cycles(graph)
    described = [
        "; ".join(f"{a}:{lines[(a, b)]} -> {b}" for a in c for b in c if (a, b) in lines)
        for c in cycles
    ]
    assert not cycles, "\n".join(described)


def test_nothing_outside_the_cli_imports_it():
    """`ttt.cli` is the top: a library module (the sweeps' job entry included) that
    reaches up into it makes the CLI a dependency of what it calls."""
    graph, lines = _graph()
    offenders = [
        f"{a}:{lines[(a, b)]} imports {b}"
        for a, targets in graph.items()
        if not a.startswith("ttt.cli")
        for b in targets
        if b == "ttt.cli" or b.startswith("ttt.cli.")
    ]
    assert not offenders, "\n".join(offenders)


# Writes to process-wide state: the environment, signal handlers, the standard streams,
# logging filters and jax.config.
PROCESS_WRITES = re.compile(
    r"os\.environ\[[^\]]+\]\s*=|os\.environ\.(setdefault|update|pop)\(|os\.putenv\("
    r"|del os\.environ|signal\.signal\(|sys\.(stdout|stderr)\s*=[^=]|jax\.config\.update\("
    r"|\.addFilter\("
)


def test_process_state_is_written_in_one_place():
    offenders = _lines(PROCESS_WRITES, {"ttt/process.py"})
    assert not offenders, "\n".join(offenders)


def test_nothing_changes_process_state_at_import_time():
    """No module calls `ttt.process` (or anything else) at its top level to change the
    process: only the entry points do, from functions. The CLI's registering of its
    commands is a module-level call that changes nothing outside the CLI."""
    import ast

    offenders = []
    for path in _modules().values():
        for node in ast.parse(path.read_text()).body:
            call = node.value if isinstance(node, ast.Expr) else None
            if isinstance(call, ast.Call) and "process." in ast.unparse(call.func):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def test_an_import_inside_a_function_says_why():
    """Imports sit at a module's top, where they show its dependencies. One kept inside a
    function (start-up time of the CLI, JAX or Ray kept out of a light command, an
    optional dependency) carries a comment on its line or the line above, or its module
    says so once with a `# deferred imports:` line."""
    import ast

    offenders = set()  # a set: a nested function's imports are walked twice
    for path in _modules().values():
        source = path.read_text()
        if "# deferred imports:" in source:
            continue
        lines = source.splitlines()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    line, above = lines[node.lineno - 1], lines[node.lineno - 2]
                    statement = "".join(lines[node.lineno - 1 : node.end_lineno])
                    if "#" not in statement and not above.strip().startswith("#"):
                        offenders.add(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
    assert not offenders, f"{len(offenders)} imports inside functions, no reason given:\n" + (
        "\n".join(sorted(offenders))
    )
