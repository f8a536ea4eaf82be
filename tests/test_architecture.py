"""The package's shape: imports point one way, no cycles; the project speaks only of itself.

Layers, lowest first: utilities (the top-level modules: errors, options, atomic, distributed, ...),
``mak.data``, then ``mak.selection`` and ``mak.train`` (side by side, neither imports the other),
``mak.bench`` and the public API (``mak/__init__``), ``mak.run``, ``mak.cli``. A module may import
from a lower layer or from its own subpackage, never from a higher or a sibling one; within a
subpackage the imports form no cycle. Function-level imports count like top-level ones.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mak"
LAYERS = {"data": 1, "selection": 2, "train": 2, "bench": 3, "run": 4, "cli": 5}
API_LAYER = 3  # the package itself (mak/__init__.py) gathers the engine's public functions


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> set[str]:
    """The mak modules ``path`` imports (``from mak import x`` names the submodule mak.x when it is one)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mak"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "mak":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if (SRC.parent / (sub.replace(".", "/") + ".py")).is_file()
                        or (SRC.parent / sub.replace(".", "/")).is_dir() else base)
    out.discard(name)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in imports(p, m) if i in mods} for m, p in mods.items()}


def layer(mod: str) -> tuple[int, str]:
    """(layer, subpackage) of a module."""
    parts = mod.split(".")
    if mod == "mak":
        return API_LAYER, "mak"
    if mod == "mak.__main__":
        return 6, "__main__"
    if len(parts) > 2 or parts[1] in LAYERS:
        return LAYERS[parts[1]], parts[1]
    return 0, "utilities"


def test_every_import_points_down_or_within_its_subpackage():
    bad = []
    for mod, deps in graph().items():
        lm, pm = layer(mod)
        for dep in deps:
            ld, pd = layer(dep)
            if pd != pm and not ld < lm:
                bad.append(f"{mod} (layer {lm}, {pm}) imports {dep} (layer {ld}, {pd})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_library_never_imports_the_cli():
    offenders = [m for m, deps in graph().items() if not m.startswith(("mak.cli", "mak.__main__"))
                 and any(d.startswith("mak.cli") for d in deps)]
    assert not offenders


def test_the_checker_sees_a_planted_upward_import_and_cycle(tmp_path, monkeypatch):
    fake = tmp_path / "mak"
    for rel, text in {"__init__.py": "", "errors.py": "from mak.run import job\n",
                      "run/__init__.py": "", "run/job.py": "from mak.run import other\n",
                      "run/other.py": "from mak.run import job\n"}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    with pytest.raises(AssertionError, match="mak.errors .* imports mak.run.job"):
        test_every_import_points_down_or_within_its_subpackage()
    with pytest.raises(AssertionError, match="mak.run.job -> mak.run.other -> mak.run.job"):
        test_no_import_cycles()


# What a line may not say: it describes what the software does and what was measured, not how
# the code came to be. Each entry is a word and what must follow it for the line to be flagged
# (numbered work items, tracker numbers, replaced settings, former timings), kept apart here so
# that this file, which must name them, does not itself read as such a line.
NARRATION = [(r"\bsession", r"s? \d"), (r"\bissue", r" #?\d"), (r"\bold", r" defaults?\b"),
             (r"\(was", r" \d"), (r"\bwas", r" \d[\d.,]* ?(ms|s|µs|us|x)\b"),
             (r"\bround", r" \d+ of (past|earlier)"), (r"\bprevious", r"ly\b"),
             (r"\bused", r" to (be|pick|take)\b"), (r"\btuning", r" log\b")]
FLAGGED = re.compile("|".join(word + rest for word, rest in NARRATION), re.IGNORECASE)


def test_the_narration_pattern_flags_what_it_should():
    assert FLAGGED.search("the default " + "was" + " 8.2 ms") and FLAGGED.search("see " + "issue" + " #12")
    assert not FLAGGED.search("the issue of junk in the pool; 8.2 ms per pick at N = 200,000")


def test_code_docs_and_tests_speak_only_of_the_software():
    files = [*SRC.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*"),
             *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").glob("*.yaml"), ROOT / "README.md",
             ROOT / "CHANGELOG.md", ROOT / "Makefile"]
    hits = []
    for f in files:
        if f.resolve() == Path(__file__).resolve() or not f.is_file():
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if FLAGGED.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], []])
def test_the_top_level_cli_starts_without_torch(argv):
    """`mak --help` / `--version` register only the commands' one-line HELP: no torch, no numpy."""
    import subprocess
    import sys

    code = ("import sys\nfrom mak.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_public_api_loads_on_first_use():
    import mak

    for name in mak.__all__:
        assert getattr(mak, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mak.nothing  # noqa: B018
    assert "robust" in mak.STRATEGIES
