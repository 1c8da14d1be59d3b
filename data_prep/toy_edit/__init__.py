"""The `toy_edit` TFDS dataset (array_record, no TensorFlow needed) and a build-on-first-use helper.

    from data_prep import toy_edit
    toy_edit.ensure_built("/data/tfds", "32px")                  # once; later calls return at once
    source = toy_edit.data_source("/data/tfds", "32px", "train")  # random access, uint8 images

Importing it registers the dataset's hooks (builder, vocabulary, judge, judge server) in
`mre.data.registry`, where the trainer and `mre.eval` look them up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import tensorflow_datasets as tfds

from data_prep.toy import judge
from data_prep.toy.vocabulary import vocabulary
from data_prep.toy_edit import toy_edit_dataset_builder
from data_prep.toy_edit.toy_edit_dataset_builder import CONFIGS, DEFAULT_CONFIG, Builder, ToyEditConfig
from mre.data import registry

NAME = "toy_edit"
FILE_FORMAT = "array_record"


def dataset_name(config_name: str = DEFAULT_CONFIG) -> str:
  """The TFDS name of a config, e.g. "toy_edit/32px" (what `tfds.data_source` takes)."""
  _check_config(config_name)
  return f"{NAME}/{config_name}"


def ensure_built(data_dir: str, config_name: str = DEFAULT_CONFIG) -> Builder:
  """Builds toy_edit/<config_name> under data_dir unless it is there already; returns the builder.

  Several processes on one machine may call this at once: a file lock lets the first build and
  the others wait. Across machines, build on one process first (e.g. jax.process_index() == 0)
  and let the others wait for it before reading.
  """
  _check_config(config_name)
  os.makedirs(data_dir, exist_ok=True)
  builder = Builder(config=config_name, data_dir=data_dir, file_format=FILE_FORMAT)
  with _lock(os.path.join(data_dir, f".{NAME}_{config_name}.lock")):
    builder.download_and_prepare(file_format=FILE_FORMAT)
  return builder


def data_source(data_dir: str, config_name: str = DEFAULT_CONFIG, split: str = "train"):
  """Random-access source of one split (records are dicts of numpy arrays / bytes)."""
  return tfds.data_source(dataset_name(config_name), split=split, data_dir=data_dir, download=False)


def _check_config(config_name: str) -> None:
  names = [c.name for c in CONFIGS]
  if config_name not in names:
    raise ValueError(f"unknown toy_edit config {config_name!r}; expected one of {names}")


@contextlib.contextmanager
def _lock(path: str):
  with open(path, "w") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _serve_judge():
  # Imported when asked for: the server module defines its command-line flags on import.
  from data_prep.toy.judge_server import serve_in_thread  # pylint: disable=import-outside-toplevel

  return serve_in_thread()


# What the trainer and `mre.eval` find through the registry (they do not import the toy world).
HOOKS = registry.register(
    registry.DatasetHooks(
        NAME,
        default_config=DEFAULT_CONFIG,
        build=ensure_built,
        vocabulary=vocabulary,
        judge=judge.judge,
        serve_judge=_serve_judge,
    )
)


__all__ = [
    "NAME",
    "CONFIGS",
    "DEFAULT_CONFIG",
    "Builder",
    "ToyEditConfig",
    "dataset_name",
    "ensure_built",
    "data_source",
    "toy_edit_dataset_builder",
    "HOOKS",
]
