"""What a dataset offers beyond its prepared TFDS files, registered by the module that defines it.

The library does not import the data scripts. A dataset's own module registers its hooks when it is
imported, for example

    registry.register(registry.DatasetHooks("toy_edit", default_config="24px", build=ensure_built,
                                            vocabulary=vocabulary, judge=judge))

and `hooks_for` imports that module by name before it looks the hooks up. The name comes from one of
two places, in this order:
  * the caller's `modules`: the trainer passes `config.data.modules` (configs/common.py lists the
    project's dataset modules), which is how a dataset that is not built yet is found;
  * the prepared dataset itself: TFDS records in `dataset_info.json` the module whose builder wrote
    it (`moduleName`), and that module is imported (this is how `mre.eval --toy_judge` finds the
    judge of a prepared benchmark).
A dataset that registers nothing (a plain TFDS dataset) has no hooks: `hooks_for` returns None.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, ContextManager, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class DatasetHooks:
  """A dataset's extras; every hook is optional.

  build(data_dir, config_name): prepares the dataset under data_dir unless it is there already
    (several processes on one machine may call it at once).
  vocabulary(): the closed word list of its texts (a from-scratch tokenizer is built over it).
  judge(instruction, original, edited): verdicts of one edit, in process (validation).
  serve_judge(): a context manager serving that judge over an OpenAI-compatible HTTP API on
    127.0.0.1; it yields an object with a `base_url`.
  """

  name: str
  default_config: str = ""
  build: Optional[Callable[[str, str], Any]] = None
  vocabulary: Optional[Callable[[], list]] = None
  judge: Optional[Callable[[str, Any, Any], Any]] = None
  serve_judge: Optional[Callable[[], ContextManager]] = None

  def tfds_name(self, config_name: str = "") -> str:
    """The name `tfds.data_source` takes: "name/config" (the default config when none is given)."""
    config_name = config_name or self.default_config
    return f"{self.name}/{config_name}" if config_name else self.name


_HOOKS: dict[str, DatasetHooks] = {}


def register(hooks: DatasetHooks) -> DatasetHooks:
  """Registers (or replaces: a module may be reloaded) the hooks of `hooks.name`."""
  _HOOKS[hooks.name] = hooks
  return hooks


def registered(name: str) -> Optional[DatasetHooks]:
  """The hooks registered so far for a dataset name ("toy_edit"; a "/config" suffix is ignored)."""
  return _HOOKS.get(name.split("/")[0])


def hooks_for(name: str, data_dir: str = "", modules: Sequence[str] = ()) -> Optional[DatasetHooks]:
  """The hooks of dataset `name`, after importing `modules` and, when that registered none, the
  module that built the prepared dataset in `data_dir` (see the module docstring)."""
  for module in modules:
    importlib.import_module(module)
  if registered(name) is None and data_dir:
    module = builder_module(name, data_dir)
    if module:
      _import_if_present(module)
  return registered(name)


def builder_module(name: str, data_dir: str) -> Optional[str]:
  """The module whose builder prepared `name` ("toy_edit/24px") in data_dir, as TFDS recorded it;
  None when the dataset is not prepared there."""
  if not os.path.isdir(os.path.join(data_dir, name.split("/")[0])):
    return None
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    return tfds.builder(name, data_dir=data_dir).info.module_name or None
  except Exception:  # pylint: disable=broad-except
    return None  # not prepared (or not readable): nothing recorded to import


def _import_if_present(module: str):
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:  # built elsewhere by code that is not here: no hooks
    if not (e.name and (module == e.name or module.startswith(e.name + "."))):
      raise
