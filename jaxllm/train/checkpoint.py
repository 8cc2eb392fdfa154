"""Orbax checkpoints of the whole run: train state, data-iterator state and the config.

Saves are asynchronous (training continues while arrays are written); the data-iterator state is
captured synchronously at save time, so a resumed run sees exactly the batches it would have.
Restores are made against the abstract, sharded state, so a checkpoint can be loaded onto a
different mesh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp


class _IteratorSnapshot:
  """Grain's Orbax handler calls `get_state()` when it writes; this pins the state to the moment
  of `save` even when the write happens later on a background thread."""

  def __init__(self, state: Any):
    self._state = json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


class _IteratorRestorer:
  """Adapts any iterator with dict `set_state` to Grain's handler (which passes bytes)."""

  def __init__(self, iterator):
    self.iterator = iterator

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


class Checkpointer:
  def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, meta: dict | None = None,
           force: bool = True) -> None:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None):
    """Restores (state, meta) at `step` (default: latest) and, if given, the iterator in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"No checkpoint in {self.directory}: train first (`jaxllm train ...`) or point "
          "--workdir at a run that has saved one.")
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored.state, restored.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def require_checkpoint(workdir: str | Path) -> Path:
  """The run's checkpoint directory, or a FileNotFoundError that says what to do."""
  workdir = Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if not (workdir / "config.json").is_file() or not ckpt_dir.is_dir():
    raise FileNotFoundError(
        f"No run found at --workdir {workdir} (expected {workdir}/config.json and "
        f"{ckpt_dir}/): train one first with `jaxllm train --config ... "
        f"--set train.workdir={workdir}`, or pass the workdir of an existing run.")
  return ckpt_dir
