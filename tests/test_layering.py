"""The import graph points one way: the library (`mre/`) never imports the data scripts
(`data_prep/`); only the toy replication (`mre/experiments/`), a script itself, may. And the
networks (`mre/models/`) import no file formats (`mre/model_io/` reads and writes weights)."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = (os.path.join("mre", "experiments") + os.sep,)


def _imports(path):
  """Every module a file imports, at the top or inside functions, and every string naming one."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node.module
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      if node.value.split(".")[0] == "data_prep":  # importlib.import_module("data_prep....")
        yield node.value


def _library_files():
  for path in sorted(glob.glob(os.path.join(ROOT, "mre", "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, ROOT)
    if not rel.startswith(ALLOWED):
      yield rel, path


def test_the_library_does_not_import_the_data_scripts():
  files = list(_library_files())
  assert len(files) > 30
  offending = [
      (rel, name)
      for rel, path in files
      for name in _imports(path)
      if name.split(".")[0] == "data_prep"
  ]
  assert not offending, offending


def test_the_check_sees_imports_inside_functions(tmp_path):
  path = tmp_path / "m.py"
  path.write_text(
      "def f():\n  from data_prep.toy import judge\n  import importlib\n"
      "  importlib.import_module('data_prep.toy_edit')\n"
  )
  assert [n for n in _imports(str(path)) if n.startswith("data_prep")] == [
      "data_prep.toy",
      "data_prep.toy_edit",
  ]


def test_the_networks_import_networks_only():
  """`mre/models/` holds networks; reading and writing weights is `mre/model_io/`."""
  allowed = {"__future__", "dataclasses", "json", "math", "os", "typing", "jax", "flax", "numpy"}
  for path in sorted(glob.glob(os.path.join(ROOT, "mre", "models", "*.py"))):
    for name in _imports(path):
      top = name.split(".")[0]
      assert top in allowed or name.startswith("mre.models"), (os.path.relpath(path, ROOT), name)
