"""The package's layering: a framework-free core, no import cycles, no
borrowed private helpers, one list of methods."""

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "aqt_ext"
FRAMEWORKS = ("flax", "optax", "orbax", "absl", "ml_collections",
              "tensorflow", "tensorflow_datasets", "clu", "grain")
STDLIB = set(sys.stdlib_module_names)


def _imports(path: pathlib.Path) -> list[tuple[str, tuple[str, ...]]]:
  """(module, imported names) of every import statement in `path`."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(a.name, ()) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      out.append((node.module, tuple(a.name for a in node.names)))
  return out


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PKG.parent).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def _top_level_imports(path: pathlib.Path) -> set[str]:
  """aqt_ext modules `path` imports at module level (not inside functions)."""
  found = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return {m for m in found if m.startswith("aqt_ext")}


@pytest.mark.parametrize("package", ["core"])
def test_core_imports_only_jax_numpy_and_the_standard_library(package):
  files = sorted((PKG / package).glob("*.py"))
  assert files
  for path in files:
    for module, _ in _imports(path):
      top = module.split(".")[0]
      assert top in ("jax", "numpy", "aqt_ext") or top in STDLIB, (
          f"{path.name} imports {module}")
      if top == "aqt_ext":
        assert module.startswith("aqt_ext.core"), f"{path.name}: {module}"


def test_importing_the_core_and_configs_loads_no_framework():
  code = ("import sys, aqt_ext.core.contract, aqt_ext.core.methods, "
          "aqt_ext.config, aqt_ext.rules_report; "
          f"bad = [m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}]"
          "; print(bad); sys.exit(1 if bad else 0)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, cwd=PKG.parent, timeout=1200)
  assert r.returncode == 0, r.stdout + r.stderr


def test_no_import_cycles():
  modules = {_module_name(p): p for p in PKG.rglob("*.py")}
  graph = {m: {i for i in _top_level_imports(p) if i in modules and i != m}
           for m, p in modules.items()}
  # A package's __init__ importing its own submodules is not a cycle.
  for m in graph:
    graph[m] = {i for i in graph[m] if not (
        modules[m].name == "__init__" and i.startswith(m + "."))}
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        raise AssertionError("import cycle: " + " -> ".join(
            stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n, stack + [n])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_no_module_imports_another_modules_private_names():
  for path in PKG.rglob("*.py"):
    for module, names in _imports(path):
      if module.startswith("aqt_ext"):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path}: from {module} import {private}"


def test_method_names_are_listed_only_by_the_registry():
  """No module outside the method files spells the list of methods."""
  from aqt_ext.config import METHODS  # pylint: disable=g-import-not-at-top
  from aqt_ext.core.methods import REGISTRY  # pylint: disable=g-import-not-at-top
  assert METHODS == REGISTRY.names()
  learned = REGISTRY.learned_params()
  assert set(learned) == {"kernel_lsq_step", "input_lsq_step",
                          "input_pact_alpha", "kernel_dq_levels",
                          "kernel_dq_position", "input_dq_alpha"}
  for path in PKG.rglob("*.py"):
    if path.parent.name == "core":
      continue
    text = path.read_text()
    for name in learned:
      assert f'"{name}"' not in text, f"{path} spells {name!r}"
    assert '("uniform", "lsq", "pact")' not in text, path
