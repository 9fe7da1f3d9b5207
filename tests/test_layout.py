"""The house rules, checked on the source: imports go down the layers (none upward, no cycle,
function-level and type-hint imports included), no function is over 60 lines or takes more than 8
parameters, and the tests mirror the package (every module in TESTED has its test module)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

PKG = Path(__file__).resolve().parent.parent / "quantfix"
TESTS = Path(__file__).resolve().parent
SCRIPTS = PKG.parent / "scripts"

# bottom to top: a component may import components of its own layer's predecessors only (and its
# own package's modules); a new module must be placed here
LAYERS: List[List[str]] = [
    ["errors", "logs", "timing", "weights", "plotting", "__init__"],
    ["cache", "arch", "runtime"],
    ["llamacpp"],  # below the registry: its gguf entries simulate with ggml's own quantizers
    ["quantize"],
    ["config", "layerwise"],
    ["plan"],
    ["formats", "gguf_plan"],
    ["source"],
    ["loading", "data", "evaluate", "tasks", "calib"],
    ["verdict", "runreport", "tune", "export", "bank", "gguf_export"],
    ["trials", "verify", "existing", "diagnose", "sequential"],
    ["planner", "explain"],
    ["search", "report"],
    ["budget"],
    ["recipe"],
    ["cli", "tools"],
    ["__main__"],
]
LAYER = {c: i for i, layer in enumerate(LAYERS) for c in layer}


def _modules() -> Dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(f: Path, mods: Dict[str, Path]) -> Set[str]:
    """quantfix modules imported anywhere in ``f`` (functions and TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from pkg import submodule" needs the submodule; "from module import name" the module
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in mods] or [node.module]
            if len(names) < len(subs):
                names.append(node.module)
        for n in names:
            if n.startswith("quantfix"):
                while n not in mods and "." in n:
                    n = n.rsplit(".", 1)[0]
                found.add(n)
    return found


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {m: _imports(f, _modules()) - {m} for m, f in _modules().items()}


def test_every_module_has_a_layer():
    missing = sorted({_component(m) for m in GRAPH} - set(LAYER))
    assert not missing, f"place these in tests/test_layout.py LAYERS: {missing}"


def test_nothing_imports_upward():
    bad = []
    for m, deps in GRAPH.items():
        for d in deps:
            a, b = _component(m), _component(d)
            if a != b and d != "quantfix" and LAYER.get(b, 99) >= LAYER.get(a, -1):
                bad.append(f"{m} -> {d} (layer {LAYER.get(a)} -> {LAYER.get(b)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    seen: Dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m, stack):
        seen[m] = 1
        for d in GRAPH.get(m, ()):
            if d == "quantfix" or d not in GRAPH:
                continue
            assert seen.get(d) != 1, "import cycle: " + " -> ".join(stack + [m, d])
            if d not in seen:
                visit(d, stack + [m])
        seen[m] = 2

    for m in GRAPH:
        if m not in seen:
            visit(m, [])


def _functions():
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f.relative_to(PKG.parent), node


@pytest.mark.parametrize("limit_lines,limit_params", [(60, 8)])
def test_functions_are_short(limit_lines, limit_params):
    bad = []
    for f, node in _functions():
        a = node.args
        params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
        lines = node.end_lineno - node.lineno + 1
        if lines > limit_lines or len(params) > limit_params:
            bad.append(f"{f}:{node.lineno} {node.name}: {lines} lines, {len(params)} parameters")
    assert not bad, "\n".join(bad)


def test_the_layout_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: an import from plan (layer 3) of recipe (layer 10) is upward."""
    assert LAYER["recipe"] > LAYER["plan"]
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from quantfix.recipe import run\n")
    assert "quantfix.recipe" in _imports(fake, _modules())


# The modules a user or another stage calls, each with its own test module named after it:
# tests/test_<module>.py, a subpackage's module tests/test_<package>_<module>.py, a package's
# __init__ tests/test_<package>.py. A new stage module goes here with its tests.
TESTED = {
    "recipe", "cli", "source", "loading", "weights", "cache", "runtime", "timing", "config", "arch", "layerwise",
    "plan", "data", "evaluate", "tasks", "calib", "verdict", "runreport", "tune", "sequential", "export", "bank", "trials", "verify",
    "existing", "planner", "explain", "search", "report", "llamacpp",
    "formats", "formats.gguf_tokenizer", "formats.gguf_io", "formats.packed", "formats.parent",
    "quantize.algorithms", "quantize.fake", "quantize.scales", "quantize.gguf", "gguf_plan", "gguf_export",
    "diagnose", "diagnose.rules", "diagnose.sensitivity", "diagnose.probes",
}
# test modules named after no module: the layout's own, and the demo model end to end (slow);
# tests of scripts/<name>.py are tests/test_scripts_<name>.py
OTHER_TESTS = {"test_layout", "test_demo"}


def _test_module(module: str) -> Path:
    """tests/test_<module>.py ("formats.gguf_tokenizer" -> tests/test_formats_gguf_tokenizer.py)."""
    return TESTS / f"test_{module.replace('.', '_')}.py"


def _has_a_test(f: Path) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name.startswith("test_") for n in ast.parse(f.read_text()).body)


def _package_modules() -> Set[str]:
    """quantfix's modules without the package prefix ("recipe", "formats", "formats.gguf_io", ...)."""
    return {m.split(".", 1)[1] for m in GRAPH if "." in m}


def test_every_tested_module_has_its_test_module():
    stale = sorted(TESTED - _package_modules())
    assert not stale, f"TESTED names modules quantfix does not have: {stale}"
    missing = sorted(_test_module(m).name for m in TESTED if not _test_module(m).exists())
    assert not missing, f"these modules have no test module of their own: {missing}"
    empty = sorted(_test_module(m).name for m in TESTED if not _has_a_test(_test_module(m)))
    assert not empty, f"these test modules hold no test: {empty}"


def test_every_test_module_is_named_after_what_it_tests():
    names = {_test_module(m).stem for m in _package_modules()} | OTHER_TESTS
    names |= {f"test_scripts_{s.stem}" for s in SCRIPTS.glob("*.py")}
    stray = sorted(f.name for f in TESTS.glob("test_*.py") if f.stem not in names)
    assert not stray, f"name these after the module they test (or add them to OTHER_TESTS): {stray}"


def test_the_mirror_checks_can_fail(tmp_path, monkeypatch):
    """The checks themselves can fail: in a tests folder holding only test_recipe.py and a stray
    test_nothing.py, every other module of TESTED lacks its test module, and the stray is named."""
    (tmp_path / "test_recipe.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "test_nothing.py").write_text("def test_x():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "TESTS", tmp_path)
    with pytest.raises(AssertionError, match=r"no test module of their own: \['test_arch.py', 'test_bank.py'") as info:
        test_every_tested_module_has_its_test_module()
    assert "test_recipe.py" not in str(info.value)
    with pytest.raises(AssertionError, match=r"\['test_nothing.py'\]"):
        test_every_test_module_is_named_after_what_it_tests()
