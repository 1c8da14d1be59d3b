"""Test-session setup: CPU only, float32 matmuls, and JAX's persistent compilation cache.

Compilation dominates on a 2-core CPU, so every test session reuses compiled programs from
`.jax_cache/` (ignored by git) and tests are written to compile each shape once.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # the trainer subprocesses of tests use it too
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
  """A tiny random InstructPix2Pix pipeline folder written by diffusers' own save_pretrained."""
  from tests.reference import make_tiny_pipeline_dir

  return make_tiny_pipeline_dir(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
  """The `tiny` toy_edit dataset (16 px, 48 train / 20 test items), built once per session."""
  from data_prep import toy_edit

  data_dir = str(tmp_path_factory.mktemp("toy_data"))
  toy_edit.ensure_built(data_dir, "tiny")
  return data_dir
