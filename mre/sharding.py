"""Device mesh, parameter sharding rules, batch placement, and multi-host start-up.

The mesh has axes ("data", "fsdp"). The batch is split over both; a parameter is split over "fsdp"
along its largest dimension that divides evenly (ZeRO-3 style) when it is large enough, and is
replicated otherwise. With fsdp=1 this is plain data parallelism.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(mode: str = "auto"):
  """`jax.distributed.initialize()` where a multi-process launch is detected (or forced).

  auto: TPU pod slices (several TPU workers), SLURM jobs with several tasks, or the explicit
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables (what launch/ sets).
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"config.distributed={mode!r} is not auto, on or off")
  if mode == "off" or jax.distributed.is_initialized():
    return
  env = os.environ
  explicit = "JAX_COORDINATOR_ADDRESS" in env
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
  if mode == "on" or explicit or slurm or tpu_pod:
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process
    kwargs = {}
    if explicit:
      kwargs = dict(
          coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
          num_processes=int(env["JAX_NUM_PROCESSES"]),
          process_id=int(env["JAX_PROCESS_ID"]),
      )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh; one size may be -1 (the devices left)."""
  n = jax.device_count()
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if n % known:
    raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} != {n} devices")
  devices = np.asarray(jax.devices()).reshape(sizes)
  return Mesh(devices, ("data", "fsdp", "tensor"))


# Megatron's split of a transformer layer over the "tensor" axis: the query/key/value and the
# MLP's gate/up projections by their outputs (attention heads, MLP columns), the attention output
# and MLP down projections by their inputs, so each device holds whole heads and one all-reduce
# per block joins them. A LoRA adapter's B follows its projection's output; A stays whole.
_TENSOR_OUTPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_TENSOR_INPUT = ("o_proj", "out_proj", "down_proj")


def tensor_dim(path) -> int | None:
  """The dimension of a parameter split over "tensor" (by its path: names from the root), or None."""
  names = [str(p) for p in path]
  if len(names) < 2 or names[-1] != "kernel":
    return None
  if names[-2] == "lora_B" and len(names) >= 3 and names[-3] in _TENSOR_OUTPUT:
    return 1
  if names[-2] in _TENSOR_OUTPUT:
    return 1
  if names[-2] in _TENSOR_INPUT:
    return 0
  return None


def param_spec(
    shape, fsdp_size: int, min_size: int, tensor_size: int = 1, tensor_at: int | None = None
) -> P:
  """Shard the largest evenly divisible dimension over "fsdp" if the array is large enough; with
  a "tensor" axis, `tensor_at` (see `tensor_dim`) over "tensor" first, where it divides."""
  spec = [None] * len(shape)
  if tensor_size > 1 and tensor_at is not None and shape[tensor_at] % tensor_size == 0:
    spec[tensor_at] = "tensor"
  if fsdp_size > 1 and int(np.prod(shape, dtype=np.int64)) >= min_size:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if spec[dim] is None and shape[dim] % fsdp_size == 0:
        spec[dim] = "fsdp"
        break
  return P(*spec) if any(spec) else P()


def tree_shardings(mesh: Mesh, abstract_tree, min_size: int):
  """NamedShardings for every array leaf of an abstract (eval_shape) pytree."""
  fsdp = mesh.shape["fsdp"]
  tensor = mesh.shape.get("tensor", 1)

  def one(path, x):
    shape = getattr(x, "shape", ())
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    at = tensor_dim([n for n in names if n not in ("value", "raw_value")])
    return NamedSharding(mesh, param_spec(shape, fsdp, min_size, tensor, at))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def replicated(mesh: Mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_unsharded: int = 0):
  """Batch axis split over data x fsdp (after `leading_unsharded` axes, e.g. accumulation)."""
  return NamedSharding(mesh, P(*([None] * leading_unsharded), BATCH_AXES))


def global_batch(mesh: Mesh, local_batch: dict, leading_unsharded: int = 0) -> dict:
  """Assembles each host's part of the batch into global arrays sharded over the mesh."""
  sharding = batch_sharding(mesh, leading_unsharded)

  def one(x):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[leading_unsharded] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return jax.tree.map(one, local_batch)
