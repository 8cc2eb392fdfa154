"""Renders docs/results/quant_*.md from the JSON that experiments/quant/run.py writes.

  python experiments/quant/pages.py [--runs runs/quant] [--docs docs/results]

Uses `<exp>.json` when a run finished, else `<exp>.partial.json` (and says so on the page). The
learning-rate check (`run.py lr`, `lr.json`) is rendered on the ParetoQ page.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SETUP = ("4-layer Llama (d_model 128, FFN 384, 4 heads / 2 KV heads, tied embeddings, 0.82M "
         "parameters), byte tokenizer, the embedded CPython-stdlib corpus; AdamW (lr {lr:g}, "
         "warmup + cosine, weight decay 0.1 on matrices, none on scales, gradient clipping 1.0), "
         "16 x 128-token batches, {steps} steps per model ({tokens:,} tokens); held-out bits per "
         "byte (bpb) on 16 validation batches (32,768 tokens). All attention and MLP projections "
         "quantized (`layers_\\d+/(attn|mlp)/.*`); embeddings, norms (and the tied LM head) stay "
         "float32. Every model of the page sees the same batches in the same order with the same "
         "optimizer, schedule and decay mask; seed s sets the initialisation and the data order.")


def _load(runs: Path, exp: str):
  full, part = runs / f"{exp}.json", runs / f"{exp}.partial.json"
  if full.exists():
    return json.loads(full.read_text()), True
  if part.exists():
    return json.loads(part.read_text()), False
  return {}, False


def _status(done: bool) -> str:
  return "" if done else ("\n**Partial run**: the run was stopped before it finished; rows not "
                          "shown were not run. Rerun the command to complete the table.\n")


def _rows(d):
  return {k: v for k, v in d.items() if not k.startswith("_") and isinstance(v, dict)
          and "bpb" in v}


def _bpb(v, width=None) -> str:
  b, sd = v["bpb"], v.get("bpb_std")
  if width is not None:
    b, sd = b.get(str(width)), (sd or {}).get(str(width))
    if b is None:
      return "-"
  return f"{b:.4f} ± {sd:.4f}" if sd is not None else f"{b:.4f}"


def _seed0(v):
  """The first seed's bpb: rows run on one seed are compared with the FP run of that seed."""
  if not v:
    return None
  return v["bpb_seeds"][0] if v.get("bpb_seeds") else v["bpb"]


def _runtime(meta) -> str:
  if not meta:
    return "Runtime: not recorded (partial run)."
  load = meta.get("load_average_start_end", ["?", "?"])
  return (f"Runtime: {meta['minutes']} minutes on {meta.get('cpus', 2)} CPU cores, measured "
          f"while other jobs shared the same 2 cores (load average {load[0]} at the start, "
          f"{load[1]} at the end), so on idle cores it is shorter. Seeds: "
          f"{', '.join(map(str, meta['seeds']))} (the first runs every row, the others the key "
          f"rows; ± is the standard deviation over seeds). Python {meta.get('python')}, "
          f"jax {meta.get('jax')}.")


def _setup(meta, steps):
  lr = meta.get("lr", 1e-3)
  return SETUP.format(lr=lr, steps=steps, tokens=steps * 16 * 128)


def _cmd(exp, meta):
  """The command line that wrote `meta` (defaults left out)."""
  extra = ""
  if meta.get("steps", 150) != 150:
    extra += f" --steps {meta['steps']}"
  if meta.get("seeds", [0, 1]) != [0, 1]:
    extra += " --seeds " + " ".join(map(str, meta["seeds"]))
  if meta.get("jobs", 1) > 1:
    extra += f" --jobs {meta['jobs']}"
  return f"    JAXLLM_CACHE=.cache python experiments/quant/run.py {exp}{extra}"


def lr_section(lr_d, lr_done) -> str:
  rows = _rows(lr_d)
  if not rows:
    return ""
  grid = sorted({v["lr"] for k, v in rows.items() if "init x" not in k})
  models = []
  for k in rows:
    name = k.split(" @ ")[0]
    if "init x" not in k and name not in models:
      models.append(name)
  table = ["| model | " + " | ".join(f"lr {g:g}" for g in grid) + " |",
           "|---|" + "---|" * len(grid)]
  for m in models:
    cells = []
    for g in grid:
      v = rows.get(f"{m} @ lr {g:g}")
      cells.append(f"{v['bpb']:.4f}" if v else "-")
    best = min((rows[f"{m} @ lr {g:g}"]["bpb"], g) for g in grid if f"{m} @ lr {g:g}" in rows)
    cells = [f"**{c}**" if g == best[1] else c for c, g in zip(cells, grid)]
    table.append(f"| {m} | " + " | ".join(cells) + " |")
  pert = []
  for k, v in rows.items():
    base = rows.get(f"fp32 @ lr {v['lr']:g}")
    if "init x" in k and base:
      pert.append(f"- FP at lr {v['lr']:g}, initial parameters x (1 + 1e-6): {v['bpb']:.4f} "
                  f"(unperturbed {base['bpb']:.4f}, difference {v['bpb'] - base['bpb']:+.4f})")
  meta = lr_d.get("_meta", {})
  return f"""## Why the first version of these pages had quantized models beating full precision

Command (seed 0, the same steps and batches as the pages):

{_cmd("lr", meta)}

{_runtime(meta) if meta else ""}
{_status(lr_done)}
Held-out bpb after {meta.get("steps", 150)} steps at each peak learning rate (best per row in bold):

{chr(10).join(table)}

Rounding-sized perturbation of the FP run (every initial parameter scaled by 1 + 1e-6, about
eight float32 ulps):

{chr(10).join(pert)}
"""


def paretoq(d, done, steps, lr_d=None, lr_done=False):
  rows = _rows(d)
  meta = d.get("_meta", {})
  fp = _seed0(rows.get("fp32"))
  table = ["| model | held-out bpb | vs FP, same seed 0 | model bytes | bits/weight (quantized "
           "layers) | train loss, last 10 steps (mean over seeds) |", "|---|---|---|---|---|---|"]
  for k, v in rows.items():
    delta = "" if k == "fp32" or fp is None else f"{_seed0(v) - fp:+.3f}"
    table.append(f"| {k} | {_bpb(v)} | {delta} | {v.get('bytes', 0):,} | "
                 f"{v.get('quantized_bpw', 32.0):.2f} | {v['train_loss_last10']:.3f} |")
  return f"""# ParetoQ at small scale: bit-width sweep, QAT schedule, learned vs min-max scales

**Claim** (ParetoQ, README table and Fig. 1): QAT that starts from a full-precision model after
~90% of the budget beats QAT from scratch; 3-4-bit models match full precision, 2-bit and ternary
lose a little, 1-bit more; learned scales beat min-max at 2 bits.

**Command** (from a fresh clone, after the README set-up):

{_cmd("paretoq", meta)}
{_cmd("lr", (lr_d or {}).get("_meta", {}))}
    python experiments/quant/pages.py

{_runtime(meta)}

**Setup**: {_setup(meta, steps)} "QAT last 10%" trains in full precision with the QAT gates
closed, then `transforms.qat_switch` opens them at 90% of the steps and re-initialises the learned
scales from the weights (ParetoQ's init), with a fresh warmup + cosine for the QAT phase. "QAT from
scratch" quantizes from step 0. "min-max" is round-to-nearest with per-row min-max scales and a
straight-through gradient (nothing learned). Model bytes are those of `quantize_params`' packed
export (codes + float32 per-row scales; the float32 embedding is 139 KB of every model).
{_status(done)}
**Results**

{chr(10).join(table)}

{{notes}}

{lr_section(lr_d or {}, lr_done)}
{{lr_notes}}
"""


def quest(d, done, steps):
  rows = _rows(d)
  meta = d.get("_meta", {})
  fp = _seed0(rows.get("fp32"))
  table = ["| model | held-out bpb | vs FP, same seed 0 | "
           "grad cosine vs FP, layers 0 / 1 / 2 / 3 |",
           "|---|---|---|---|"]
  for k, v in rows.items():
    cos = v.get("grad_cosine_per_layer")
    delta = "" if k == "fp32" or fp is None else f"{_seed0(v) - fp:+.3f}"
    table.append(f"| {k} | {_bpb(v)} | {delta} | "
                 f"{' / '.join(f'{c:.3f}' for c in cos) if cos else '1 (reference)'} |")
  return f"""# QuEST at small scale: W4A4 / W2A2 / W1A1, trust mask and Hadamard ablations

**Claim** (QuEST): W4A4 is Pareto-optimal (eff(P) 0.69 vs 0.60 without Hadamard); W1A1 trains
stably; gradient alignment with the full-precision gradient is 0.83-0.99 with trust + Hadamard
while plain STE falls to ~0.01 deep in the network.

**Command** (from a fresh clone, after the README set-up):

{_cmd("quest", meta)}
    python experiments/quant/pages.py

{_runtime(meta)}

**Setup**: {_setup(meta, steps)} Weights and activations both quantized with `quest(b)`
(Hadamard block 128, RMS scale, Gaussian-MSE-optimal alpha, trust mask); "no Hadamard" sets
`hadamard_block=None`; "plain STE" sets `trust_scale=None`. Gradient alignment: cosine between the
quantized model's and the FP model's gradients of all projection kernels of each layer, both at
the trained FP weights (seed 0) on one held-out batch. The learning rate comes from the check on
the [ParetoQ page](quant_paretoq.md).
{_status(done)}
**Results**

{chr(10).join(table)}

{{notes}}
"""


def matquant(d, done, steps):
  widths = (8, 6, 4, 3, 2)
  rows = _rows(d)
  meta = d.get("_meta", {})
  table = ["| model | " + " | ".join(f"int{r}" for r in widths) + " |",
           "|---|" + "---|" * len(widths)]
  for k, v in rows.items():
    if k == "mix_n_match" or not isinstance(v.get("bpb"), dict):
      continue
    table.append(f"| {k} | " + " | ".join(_bpb(v, r) for r in widths) + " |")
  seeds = meta.get("seeds", [])
  if len(seeds) > 1:  # the seed spread swamps the differences: compare within each seed
    paired = [k for k, v in rows.items() if len(v.get("bpb_seeds") or []) > 1]
    table += ["", "The same rows seed by seed (only rows run on every seed; differences *within* "
              "a seed are the comparison, the spread between seeds is the noise of the start):",
              "", "| model | seed | " + " | ".join(f"int{r}" for r in widths) + " |",
              "|---|---|" + "---|" * len(widths)]
    for k in paired:
      for i, s in enumerate(seeds):
        b = rows[k]["bpb_seeds"][i]
        table.append(f"| {k} | {s} | " + " | ".join(
            f"{b[str(r)]:.4f}" if str(r) in b else "-" for r in widths) + " |")
  mix = d.get("mix_n_match")
  mix_line = (f"Mix'n'Match of the jointly trained model (seed 0; layers 0-1 int8; layers 2-3 "
              f"attention int4, MLP int2): bpb {mix['bpb']:.4f} at {mix['quantized_bpw']:.2f} "
              "bits/weight over the quantized layers (codes, scales and zero points)."
              if mix else "")
  return f"""# MatQuant at small scale: nested int8 / int4 / int2 from one model

**Claim** (MatQuant, Gemma-2 2B / 9B, Mistral 7B): the int2 slice of a jointly trained model beats
an int2 QAT baseline by +4.5 / +6.3 / +7.0 points; int8 and int4 stay within ~0.5% of separately
trained baselines; int3 / int6 slices, never trained, interpolate; naive slicing of a plain int8
model collapses at int2.

**Command** (from a fresh clone, after the README set-up):

{_cmd("matquant", meta)}
    python experiments/quant/pages.py

{_runtime(meta)}

**Setup**: {_setup(meta, steps)} Weights are int8 min-max parents per output row; the r-bit
model uses the slice S(q, r) (`policy.matquant(r)`, straight-through gradient). "MatQuant joint"
minimises L8 + L4 + L2 on each batch (`matquant.joint_loss_fn`); "int8 QAT, sliced naively" trains
only the int8 model and slices it afterwards; "intR QAT (separately trained)" trains one QAT model
per width. int6 and int3 slices of the joint model are never trained. The learning rate comes from
the check on the [ParetoQ page](quant_paretoq.md).
{_status(done)}
**Results** (held-out bpb of each slice width)

{chr(10).join(table)}

{mix_line}

{{notes}}
"""


NOTES_FILE = Path(__file__).with_name("notes.md")


def _notes() -> dict[str, str]:
  """Hand-written interpretation per page, from `notes.md` (`## <page>` sections)."""
  out, key = {}, None
  if NOTES_FILE.exists():
    for line in NOTES_FILE.read_text().splitlines(keepends=True):
      if line.startswith("## "):
        key = line[3:].strip()
        out[key] = ""
      elif key:
        out[key] += line
  return {k: v.strip() for k, v in out.items()}


_REF = re.compile(r"\{(paretoq|quest|matquant|lr):([^}#|]+?)(?:#(\d))?(\|mean|\|s\d)?\}")


def fill(text: str, data: dict[str, dict]) -> str:
  """Replaces `{exp:row name}` (bpb, mean ± std), `{exp:row name#w}` (the int-w slice of a
  MatQuant row), `{...|mean}` (the mean alone) and `{...|s0}` (seed 0's value) in the notes
  with the numbers of the runs, so that the notes never carry a number the JSON does not."""

  def sub(m):
    exp, name, width, pick = m.groups()
    v = _rows(data.get(exp, {})).get(name.strip())
    if v is None:
      return f"(missing: {exp} row {name.strip()!r})"
    if pick:
      b = v["bpb"] if pick == "|mean" else v["bpb_seeds"][int(pick[2:])]
      return f"{b if width is None else b[width]:.4f}"
    return _bpb(v, None if width is None else int(width))

  return _REF.sub(sub, text)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", default="runs/quant")
  ap.add_argument("--docs", default="docs/results")
  args = ap.parse_args()
  Path(args.docs).mkdir(parents=True, exist_ok=True)
  runs, notes = Path(args.runs), _notes()
  lr_d, lr_done = _load(runs, "lr")
  data = {e: _load(runs, e)[0] for e in ("paretoq", "quest", "matquant")} | {"lr": lr_d}
  for exp, render in (("paretoq", paretoq), ("quest", quest), ("matquant", matquant)):
    d, done = _load(runs, exp)
    if not d:
      continue
    steps = d.get("_meta", {}).get("steps", 150)
    page = render(d, done, steps, lr_d, lr_done) if exp == "paretoq" else render(d, done, steps)
    page = page.replace("{notes}", fill(notes.get(exp, ""), data))
    page = page.replace("{lr_notes}", fill(notes.get("lr", ""), data))
    Path(args.docs, f"quant_{exp}.md").write_text(page.rstrip() + "\n")
    print("wrote", Path(args.docs, f"quant_{exp}.md"))


if __name__ == "__main__":
  main()
