"""The package's import graph: no cycles, and no import from a lower layer into a higher one.

Read from the source (``ast``), not by importing, so lazy imports inside functions count as well: a cycle
through a function-level import is still a cycle, only deferred.  Layers, lowest first (docs/design.md, "Layers"):

    base        _env, _ext, _validate, _backend    (the registry names implementations as strings)
    kernels     ops.triton.*                      (import nothing of ours outside ops/triton but _env)
    reference   reference.*                       (plain torch: the spec)
    ops         ops.* (custom ops, engines)
    api         functional, objectives, distributed, distillation, modules, _info, the package itself
    top         integrations.*, cli, demo*

A module may import its own layer or any layer below it.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "bond_kernels"
PKG = "bond_kernels"
LAYERS = ["base", "kernels", "reference", "ops", "api", "top"]


def _modules():
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    name = module[len(PKG) + 1 :] if module != PKG else ""
    if name in ("_env", "_ext", "_validate", "_backend", "_C"):
        return "base"
    if name.startswith("ops.triton"):
        return "kernels"
    if name.startswith("reference"):
        return "reference"
    if name.startswith("ops"):
        return "ops"
    if name.startswith(("integrations", "cli", "demo", "_demo")):
        return "top"
    return "api"


def _resolve(module: str, is_package: bool, node: ast.AST):
    """Our modules that ``node`` (an Import or ImportFrom in ``module``) imports."""
    found = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        # ``from pkg import name``: name may be a submodule (the compiled ``_C`` too, which has no source)
        subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES or a.name == "_C"]
        # ``from . import sub`` imports the submodule (its package is already being imported)
        names = ([] if subs and node.module is None else [target]) + [s for s in subs if s in MODULES]
    for name in names:
        if name == PKG or name.startswith(PKG + "."):
            while name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]  # ``import a.b.c`` of an attribute: the module that holds it
            if name in MODULES:
                found.append(name)
    return found


def _edges():
    edges = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in _resolve(module, is_package, node) if t != module)
        edges[module] = targets
    return edges


EDGES = _edges()


def test_the_walk_sees_the_package():
    # The walk can fail: it must find the modules and the imports everybody knows are there.
    assert f"{PKG}.functional" in MODULES and f"{PKG}.ops.triton.token_logprobs" in MODULES
    assert f"{PKG}._backend" in EDGES[f"{PKG}.functional"]
    assert f"{PKG}.ops.triton._config" in EDGES[f"{PKG}.ops.triton.token_logprobs"]


def test_no_import_cycle():
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(EDGES.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(EDGES):
        if m not in state:
            visit(m)
    # A package's __init__ importing its own submodules is how packages work, not a cycle between roles.
    cycles = [c for c in cycles if not any(a != b and b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    here = LAYERS.index(_layer(module))
    upward = sorted(t for t in EDGES[module] if LAYERS.index(_layer(t)) > here)
    assert not upward, f"{module} ({_layer(module)}) imports from higher layers: {upward}"


# The one module the kernels may import from outside ops/triton: the environment reader, a leaf.
ENV = f"{PKG}._env"


def test_env_reader_is_a_leaf():
    assert ENV in MODULES and not EDGES[ENV]
    source = MODULES[ENV].read_text()
    assert "import torch" not in source  # the package's first import, before torch


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "kernels"))
def test_kernels_import_only_kernels(module):
    outside = sorted(t for t in EDGES[module] if _layer(t) != "kernels" and t != ENV)
    assert not outside, f"{module} imports from outside ops/triton: {outside}"


def test_layer_rule_can_fail():
    # A synthetic upward import is caught by the same rule (kernels importing ops, ops importing the API).
    assert LAYERS.index(_layer(f"{PKG}.ops.linear_token_logprobs")) > LAYERS.index(
        _layer(f"{PKG}.ops.triton.linear_token_logprobs")
    )
    assert LAYERS.index(_layer(f"{PKG}.functional")) > LAYERS.index(_layer(f"{PKG}.ops.token_logprobs"))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_library_files_under_600_lines(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines < 600, f"{MODULES[module]} has {lines} lines (the limit is 600: split it by role)"
