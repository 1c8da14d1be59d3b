"""Orbax checkpoints of a training run: the train state, the data iterator position, and preemption.

Each checkpoint holds `state` (params, EMA, optimizer state, step, RNG; restored straight into the
mesh shardings) and `data` (the input pipeline's iterator state as JSON), so a restarted run
continues on exactly the next batch. Saves are asynchronous; the newest `keep` are kept.
"""

from __future__ import annotations

import json
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

  def stop_reason(self, stop: "StopSignal", step: int):
    """Why a run stops after `step` ("signal N", "preemption notice"), or None: then it saves a
    checkpoint whatever `checkpoint_every` says, and returns."""
    if stop.requested:
      return f"signal {stop.signum}"
    return "preemption notice" if self.reached_preemption(step) else None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree: the restore target. A host (numpy)
  leaf, e.g. a weight loaded from a folder and not yet stepped, restores onto the default device."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


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


def run_summary(workdir, step, start_step, history, validations) -> dict:
  """What a trainer returns and writes to `train_summary.json` (`write_summary`)."""
  return {
      "workdir": workdir,
      "step": step,
      "resumed_from": start_step,
      "history": history,
      "validation": validations,
  }


def stopped_summary(summary: dict, stopped: str) -> dict:
  """`summary` of a run stopped by a signal or a preemption notice, which is said and logged."""
  msg = (
      f"stopped at step {summary['step']} on {stopped}; checkpoint saved, rerun the command to "
      "resume"
  )
  logging.warning(msg)
  print(msg)
  return {**summary, "stopped": stopped}


def write_summary(workdir: str, summary: dict) -> str:
  """`workdir/train_summary.json`, whole or not at all (for readers and a killed run). Call it
  from one process: two truncating one file garble it."""
  path = os.path.join(workdir, "train_summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(path + ".tmp", path)
  return path
