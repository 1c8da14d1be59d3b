"""Orbax checkpoints of a training run: the train state, the data iterator position, and preemption.

Each checkpoint holds `state` (params, EMA, optimizer state, step, RNG; restored straight into the
mesh shardings) and `data` (the input pipeline's iterator state as JSON), so a restarted run
continues on exactly the next batch. Saves are asynchronous; the newest `keep` are kept.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state, *, force=False) -> bool:
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=force,
    )
    if saved:
      logging.info(
          "checkpoint %d -> %s%s",
          step,
          self.directory,
          " (async)" if self.manager._options.enable_async_checkpointing else "",
      )  # pylint: disable=protected-access
    return saved

  def restore(self, abstract_state, step=None):
    """(state, data_state) of `step` (default: the latest), with the shardings of the abstract."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.data

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got a preemption notice (TPU maintenance events)."""
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag the training loop polls: save, then exit cleanly."""

  def __init__(self):
    self.event = threading.Event()
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self.event.set()

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  @property
  def requested(self) -> bool:
    return self.event.is_set()
