"""Metrics to TensorBoard event files and JSON lines (process 0 only), and loss-curve plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
  def __init__(self, workdir: str | Path):
    self.active = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in values.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    for k, v in values.items():
      if math.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
  path = Path(path)
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (safe on headless machines)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def moving_average(x, k: int = 10):
  """Trailing-window mean of a 1-D series for plotting; returned unchanged when shorter than k."""
  import numpy as np
  x = np.asarray(x, np.float64)
  return x if len(x) < k else np.convolve(x, np.ones(k) / k, mode="valid")


def save_json(out_dir: str | Path, name: str, obj: Any) -> Path:
  """Writes `obj` as `<out_dir>/<name>.json`, creating the folder."""
  path = Path(out_dir) / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1))
  return path


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path,
                    baseline_bpb: float | None = None) -> Path:
  """Train loss and eval bits per byte against step, from the run's metrics.jsonl."""
  plt = pyplot()

  rows = read_metrics(metrics_path)
  train = [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
  evals = [(r["step"], r["bpb"]) for r in rows if r["split"] == "eval"]
  fig, ax = plt.subplots(1, 2, figsize=(10, 4))
  if train:
    ax[0].plot(*zip(*train), label="train loss (nats/token)")
  ax[0].set_xlabel("step")
  ax[0].set_ylabel("loss")
  ax[0].legend()
  if evals:
    ax[1].plot(*zip(*evals), "o-", label="held-out bits/byte")
  if baseline_bpb is not None:
    ax[1].axhline(baseline_bpb, color="gray", ls="--", label="unigram baseline")
  ax[1].set_xlabel("step")
  ax[1].set_ylabel("bits per byte")
  ax[1].legend()
  fig.tight_layout()
  out_png = Path(out_png)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png
