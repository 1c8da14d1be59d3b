"""Mesh construction and the FSDP parameter rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mre import sharding


def test_param_spec_shards_the_largest_divisible_dim_of_large_arrays():
  assert sharding.param_spec((3, 3, 320, 640), 4, 1000) == P(None, None, None, "fsdp")
  assert sharding.param_spec((1280, 7), 4, 1000) == P("fsdp", None)
  assert sharding.param_spec((7, 5), 4, 1) == P()  # nothing divides
  assert sharding.param_spec((320,), 4, 1000) == P()  # too small
  assert sharding.param_spec((4096, 4096), 1, 0) == P()  # no fsdp axis


def test_make_mesh_fills_and_checks():
  mesh = sharding.make_mesh(-1, 1)
  assert mesh.shape == {"data": jax.device_count(), "fsdp": 1}
  with pytest.raises(ValueError, match="at most one mesh axis"):
    sharding.make_mesh(-1, -1)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(-1, jax.device_count() + 1)


def test_global_batch_keeps_values():
  mesh = sharding.make_mesh(-1, 1)
  local = {"x": np.arange(2 * jax.device_count() * 3, dtype=np.float32).reshape(2, -1, 3)}
  out = sharding.global_batch(mesh, local, leading_unsharded=1)
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
