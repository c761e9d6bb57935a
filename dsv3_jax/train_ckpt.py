"""Training checkpoints with Orbax's CheckpointManager: periodic async saves, keep the last N.

A checkpoint holds the whole TrainState (step, float32 params, MoE correction biases, optimizer
state, RNG key) as Orbax arrays, sharded as they are in memory (every host writes its shards),
plus a JSON record (`meta`: data position, seed, sequence length, token-file fingerprint) so a
resumed run continues on exactly the batches it would have seen.

Saves are atomic: Orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save (even by SIGKILL) resumes from the last finished checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv3_jax.train_step import TrainState


def _as_dict(state: TrainState) -> dict[str, Any]:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


class TrainCheckpointer:
  """Args: directory; keep: how many checkpoints to keep; every: save interval in steps;
  async_save: write in a background thread (the device-to-host copy still blocks)."""

  def __init__(self, directory: str, *, keep: int = 3, every: int = 100, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, meta: dict[str, Any], *, force: bool = False
           ) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether a save started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state)),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record saved with `step` (default: the latest), without reading the arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, like: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict[str, Any]]:
    """Restores `step` (default: the latest) into the shapes, dtypes and shardings of `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _as_dict(like))
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return TrainState(**out["state"]), dict(out["meta"])

  def wait(self):
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
