"""Small-scale reproductions of ParetoQ, QuEST and MatQuant claims on the embedded corpus.

  python experiments/quant/run.py lr       [--steps 150]     # the learning-rate check (below)
  python experiments/quant/run.py paretoq  [--steps 150] [--seeds 0 1] [--only NAME ...]
  python experiments/quant/run.py quest    [--steps 150] [--seeds 0 1]
  python experiments/quant/run.py matquant [--steps 150] [--seeds 0 1]

Each writes `<out>/<exp>.json` (default `runs/quant`) and prints a markdown table (held-out bits
per byte on the stdlib corpus's validation split, byte tokenizer; model bytes from
`quantize_params`). The model is a 4-layer Llama (d 128, FFN 384, 4 heads / 2 KV heads, tied
embeddings), trained with AdamW, warmup + cosine, on 16 x 128-token batches. Everything quantized
is a transform of the unchanged model (`jaxllm.quant` policies); embeddings and norms stay
float32.

Protocol. Every model of an experiment sees the same batches in the same order, with the same
optimizer, schedule and weight-decay mask (scales: Adam, no decay); only the policy differs.
Seed `s` sets both the initialisation and the data order; the first seed runs every row, the
others the rows marked as key rows, and tables give mean ± std over seeds. The learning rate
(default 1e-3) comes from `run.py lr`, which trains the FP model and two quantized models at
3e-4, 1e-3 and 3e-3: at 3e-3 (the lr of the first version of these pages) the FP model is far
past its optimum while the quantized models are not, which made quantized models look better
than FP.
On one machine a rerun gives the same numbers bit for bit; across machines XLA's float rounding
differs and the training trajectory amplifies it (see `lr`'s perturbation row).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import quant
from jaxllm.data import DataConfig, eval_batches, load_tokenizer, train_iterator
from jaxllm.eval import lm as lm_eval
from jaxllm.models import llama
from jaxllm.quant import matquant as mq
from jaxllm.quant import transforms as qt
from jaxllm.train.optim import decay_mask
from jaxllm.train.step import TrainState, lm_loss_fn, make_train_step

SEQ, BATCH, EVAL_BATCHES, LR = 128, 16, 16, 1e-3
LAYERS = r"layers_\d+/(attn|mlp)/.*"
LR_GRID = (3e-4, 1e-3, 3e-3)


class Env:

  def __init__(self, args):
    self.args = args
    self.lr = args.lr
    self.seeds = tuple(args.seeds)
    self.tok = load_tokenizer("byte")
    self.data = DataConfig(source="stdlib", tokenizer="byte")
    self.cfg = llama.LlamaConfig(vocab_size=self.tok.vocab_size, d_model=128, n_layers=4,
                                 n_heads=4, n_kv_heads=2, ffn_dim=384, tie_embeddings=True,
                                 max_seq_len=SEQ)
    self.model = llama.Llama(self.cfg)
    self.eval = list(eval_batches(self.data, self.tok, SEQ, BATCH, max_batches=EVAL_BATCHES))
    self.token_bytes = self.tok.token_bytes()

  def log(self, out, line):
    """Prints a result line and saves the results so far (runs can be cut short)."""
    print(line, flush=True)
    Path(self.args.out).mkdir(parents=True, exist_ok=True)
    Path(self.args.out, f"{self.args.exp}.partial.json").write_text(json.dumps(out, indent=1))

  def schedule(self, steps, lr):
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.1)

  def optimizer(self, steps, switch_policy=None, qat_fraction=0.1, lr=None):
    """AdamW on weights (decay on matrices), Adam on ParetoQ scales (no decay). With a
    `switch_policy`, full precision then QAT with a fresh warmup + cosine (ParetoQ starts QAT
    from a trained FP model with its own schedule)."""
    lr = lr or self.lr
    if switch_policy is None:
      sched = self.schedule(steps, lr)
    else:
      fp = round((1 - qat_fraction) * steps)
      sched = optax.join_schedules([self.schedule(fp, lr), self.schedule(steps - fp, lr)], [fp])
    weights = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(sched, weight_decay=0.1, mask=decay_mask))
    tx = qt.with_scale_optimizer(weights, optax.adam(sched))
    if switch_policy is not None:
      tx = optax.chain(tx, qt.qat_switch(steps, switch_policy, qat_fraction))
    return tx

  def train(self, model, tx, loss_fn=None, seed=0, perturb=0.0):
    """Trains from init seed `seed` on data order `seed`; `perturb` scales the initial
    parameters by (1 + perturb) (a rounding-sized change, to measure sensitivity)."""
    steps = self.args.steps
    loss_fn = loss_fn or lm_loss_fn(model, self.tok.pad_id)
    example = jnp.zeros((1, SEQ), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), example))["params"]
    if perturb:
      params = jax.tree.map(lambda p: p * (1 + perturb), params)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(seed + 1)))
    step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=(0,))
    it = train_iterator(dataclasses.replace(self.data, seed=seed), self.tok, SEQ, BATCH)
    t0, losses = time.time(), []
    for _ in range(steps):
      state, m = step(state, next(it))
      losses.append(m["loss"])
    losses = [float(x) for x in losses]
    return state.params, {"train_loss_last10": float(np.mean(losses[-10:])),
                          "seconds": round(time.time() - t0, 1)}

  def bpb(self, model, params):
    fn = jax.jit(lm_eval.make_eval_fn(model, self.tok.pad_id, self.token_bytes))
    tot = np.zeros(3)
    for b in self.eval:
      tot += np.array([float(x) for x in fn(params, b)])
    return lm_eval.summarize(*tot)["bpb"]

  def size(self, params, policy=None):
    if policy is None:
      return quant.ptq.size_report(params)
    return quant.quantize_params(params, policy)[1]



def _stats(values):
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def aggregate(runs: list[dict]) -> dict:
  """Mean (and std over seeds) of 'bpb' (a float or a {width: float} dict) and of the train
  loss; other fields from the first seed; total seconds."""
  agg = dict(runs[0], seeds=len(runs), seconds=round(sum(r["seconds"] for r in runs), 1))
  agg["train_loss_last10"] = float(np.mean([r["train_loss_last10"] for r in runs]))
  bpbs = [r["bpb"] for r in runs]
  if isinstance(bpbs[0], dict):
    agg["bpb"], agg["bpb_std"] = {}, {}
    for k in bpbs[0]:
      agg["bpb"][k], agg["bpb_std"][k] = _stats([b[k] for b in bpbs])
  else:
    agg["bpb"], agg["bpb_std"] = _stats(bpbs)
  agg["bpb_seeds"] = bpbs
  return agg


def _fmt(r):
  b = r["bpb"]
  if isinstance(b, dict):
    return " ".join(f"int{k} {v:.4f}" for k, v in b.items()) + f" ({r['seconds']} s)"
  sd = f" ± {r['bpb_std']:.4f}" if r.get("bpb_std") is not None else ""
  return f"bpb {b:.4f}{sd} (seeds {r['seeds']}, {r['seconds']} s)"


def _policy(spec_w, spec_a=None, gated=False):
  return quant.Policy((quant.Rule(LAYERS, spec_w, spec_a),), qat_gate=gated)


# ----------------------------------------------------------------------------------- the rows
# Each experiment is a list of rows `(name, key, run_one)`, `run_one(env, seed) -> dict` with
# 'bpb'; key rows run every seed, the others the first. Rows are independent trainings, so
# `--jobs N` runs them in N worker processes with the same results as one process.


def lr_rows(env):
  """The FP model at each learning rate of LR_GRID, ParetoQ 4-bit and QuEST W2A2 at the two
  largest (seed 0), and the FP model at the old lr (3e-3) with its initial parameters scaled by
  (1 + 1e-6)."""
  variants = {"fp32": None, "ParetoQ 4-bit from scratch": _policy(quant.paretoq(4)),
              "QuEST W2A2": _policy(quant.quest(2), quant.quest(2))}
  rows = []
  for name, policy in variants.items():
    for lr in LR_GRID if policy is None else LR_GRID[1:]:
      def one(env, seed, policy=policy, lr=lr):
        model = env.model if policy is None else policy.apply(env.model)
        params, info = env.train(model, env.optimizer(env.args.steps, lr=lr), seed=seed)
        return {"bpb": env.bpb(model, params), "lr": lr, **info}
      rows.append((f"{name} @ lr {lr:g}", False, one))
  for lr in (3e-3,):
    def perturbed(env, seed, lr=lr):
      params, info = env.train(env.model, env.optimizer(env.args.steps, lr=lr), seed=seed,
                               perturb=1e-6)
      return {"bpb": env.bpb(env.model, params), "lr": lr, **info}
    rows.append((f"fp32 @ lr {lr:g}, init x (1 + 1e-6)", False, perturbed))
  return rows


def lr_table(env, out):
  rows = ["| model | lr | held-out bpb |", "|---|---|---|"]
  return "\n".join(rows + [f"| {k} | {v['lr']:g} | {v['bpb']:.4f} |" for k, v in out.items()])


def paretoq_rows(env):
  def fp(env, seed):
    params, info = env.train(env.model, env.optimizer(env.args.steps), seed=seed)
    return {"bpb": env.bpb(env.model, params), "bytes": env.size(params).total_bytes,
            "quantized_bpw": 32.0, **info}

  rows = [("fp32", True, fp)]
  variants = [(f"{b}-bit {how}", quant.paretoq(b), how) for b in (1, 1.58, 2, 3, 4)
              for how in ("QAT last 10%", "QAT from scratch")]
  variants.append(("2-bit min-max (no learned scale), QAT last 10%", quant.minmax(2),
                   "QAT last 10%"))
  key_rows: set[str] = set()  # the FP row is the key row (its seed spread is the noise floor)
  for name, spec, how in variants:
    gated = how == "QAT last 10%"

    def one(env, seed, spec=spec, gated=gated):
      policy = _policy(spec, gated=gated)
      model = policy.apply(env.model)
      params, info = env.train(model, env.optimizer(env.args.steps, policy if gated else None),
                               seed=seed)
      rep = env.size(params, policy)
      return {"bpb": env.bpb(model, params), "bytes": rep.total_bytes,
              "quantized_bpw": rep.quantized_bits_per_weight, **info}

    rows.append((name, name in key_rows, one))
  return rows


def paretoq_table(env, out):
  rows = ["| model | held-out bpb | model bytes | bits/weight (quantized layers) |",
          "|---|---|---|---|"]
  return "\n".join(rows + [f"| {k} | {_fmt(v)} | {v['bytes']:,} | {v['quantized_bpw']:.2f} |"
                           for k, v in out.items()])


def _cos(a, b):
  a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _layer_kernels(grads, i):
  layer = grads[f"layers_{i}"]
  return [np.asarray(layer[g][n]["kernel"]) for g in ("attn", "mlp") for n in layer[g]]


QUEST_VARIANTS = {"QuEST (Hadamard + trust)": {}, "no Hadamard (trust)": {"hadamard_block": None},
                  "plain STE (Hadamard)": {"trust_scale": None}}


def _quest_spec(bits, kw):
  return quant.quest(bits, **{"hadamard_block": 128, **kw})


def quest_rows(env):
  def fp(env, seed):
    params, info = env.train(env.model, env.optimizer(env.args.steps), seed=seed)
    return {"bpb": env.bpb(env.model, params), "params": jax.device_get(params), **info}

  rows = [("fp32", True, fp)]
  for bits in (4, 2, 1):
    for vname, kw in QUEST_VARIANTS.items():
      def one(env, seed, spec=_quest_spec(bits, kw)):
        model = _policy(spec, spec).apply(env.model)
        params, info = env.train(model, env.optimizer(env.args.steps), seed=seed)
        return {"bpb": env.bpb(model, params), **info}
      rows.append((f"W{bits}A{bits} {vname}", False, one))
  return rows


def quest_finish(env, out, firsts):
  """Gradient alignment at the first seed's FP weights: per layer, the cosine between the
  quantized model's and the FP model's gradients of all projection kernels on one held-out
  batch (it depends on the FP weights only, not on the quantized model's training)."""
  if "fp32" not in firsts:
    return
  fp_params = firsts["fp32"].pop("params")
  batch = env.eval[0]
  fp_loss = lm_loss_fn(env.model, env.tok.pad_id)
  g_fp = jax.jit(jax.grad(lambda p: fp_loss(p, batch, None)[0]))(fp_params)
  for bits in (4, 2, 1):
    for vname, kw in QUEST_VARIANTS.items():
      name = f"W{bits}A{bits} {vname}"
      if name not in out:
        continue
      spec = _quest_spec(bits, kw)
      ql = lm_loss_fn(_policy(spec, spec).apply(env.model), env.tok.pad_id)
      g_q = jax.jit(jax.grad(lambda p, ql=ql: ql(p, batch, None)[0]))(fp_params)
      out[name]["grad_cosine_per_layer"] = [
          _cos(_layer_kernels(g_q, i), _layer_kernels(g_fp, i)) for i in range(env.cfg.n_layers)]


def quest_table(env, out):
  rows = ["| model | held-out bpb | grad cosine vs FP, layers 0 / 1 / 2 / 3 |", "|---|---|---|"]
  return "\n".join(rows + [
      f"| {k} | {_fmt(v)} | "
      f"{' / '.join(f'{c:.3f}' for c in v.get('grad_cosine_per_layer', [1.0] * 4))} |"
      for k, v in out.items()])


WIDTHS = (8, 6, 4, 3, 2)


def _evals(env, params):
  return {r: env.bpb(mq.width_policy(r, LAYERS).apply(env.model), params) for r in WIDTHS}


def matquant_rows(env):
  def joint(env, seed):
    loss = mq.joint_loss_fn(env.model, env.tok.pad_id, {8: 1.0, 4: 1.0, 2: 1.0}, LAYERS)
    params, info = env.train(env.model, env.optimizer(env.args.steps), loss, seed=seed)
    return {"bpb": _evals(env, params), "params": jax.device_get(params), **info}

  def int8(env, seed):
    params, info = env.train(mq.width_policy(8, LAYERS).apply(env.model),
                             env.optimizer(env.args.steps), seed=seed)
    return {"bpb": _evals(env, params), **info}

  rows = [("MatQuant joint (8, 4, 2)", True, joint), ("int8 QAT, sliced naively", True, int8)]
  for r in (6, 4, 3, 2):
    def one(env, seed, r=r):
      m = mq.width_policy(r, LAYERS).apply(env.model)
      params, info = env.train(m, env.optimizer(env.args.steps), seed=seed)
      return {"bpb": {r: env.bpb(m, params)}, **info}
    rows.append((f"int{r} QAT (separately trained)", r in (4, 2), one))
  return rows


def matquant_finish(env, out, firsts):
  """Mix'n'Match of the first seed's jointly trained model."""
  if "MatQuant joint (8, 4, 2)" not in firsts:
    return
  params = firsts["MatQuant joint (8, 4, 2)"].pop("params")
  mix = {r"layers_[01]/.*": 8, r"layers_[23]/attn/.*": 4, r"layers_[23]/mlp/.*": 2}
  pol = mq.width_policy(mix)
  rep = env.size(params, pol)
  out["mix_n_match"] = {"bpb": env.bpb(pol.apply(env.model), params), "bytes": rep.total_bytes,
                        "quantized_bpw": rep.quantized_bits_per_weight}


def matquant_table(env, out):
  rows = ["| model | " + " | ".join(f"int{r}" for r in WIDTHS) + " |",
          "|---|" + "---|" * len(WIDTHS)]
  for name, v in out.items():
    if isinstance(v.get("bpb"), dict):
      rows.append(f"| {name} | " + " | ".join(
          f"{v['bpb'][r]:.4f}" if r in v["bpb"] else "-" for r in WIDTHS) + " |")
  return "\n".join(rows)


EXPERIMENTS = {  # name -> (rows, finish, table)
    "lr": (lr_rows, None, lr_table),
    "paretoq": (paretoq_rows, None, paretoq_table),
    "quest": (quest_rows, quest_finish, quest_table),
    "matquant": (matquant_rows, matquant_finish, matquant_table),
}

_WORKER_ENV: Env | None = None


def _worker_init(args):
  global _WORKER_ENV
  _WORKER_ENV = Env(args)


def _run_task(name: str, seed: int) -> dict:
  env = _WORKER_ENV
  rows = {n: fn for n, _, fn in EXPERIMENTS[env.args.exp][0](env)}
  return rows[name](env, seed)


def _int_keys(v):
  if isinstance(v, dict):
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(x)
            for k, x in v.items()}
  if isinstance(v, list):
    return [_int_keys(x) for x in v]
  return v


def _resumed(env) -> dict:
  """With --resume: the rows that `<exp>.partial.json` already holds (every row is a
  deterministic function of its seed, so they equal what this run would compute)."""
  path = Path(env.args.out, f"{env.args.exp}.partial.json")
  if not env.args.resume or not path.exists():
    return {}
  return {k: _int_keys(v) for k, v in json.loads(path.read_text()).items()
          if not k.startswith("_")}


def run_experiment(env, jobs: int) -> dict:
  """All (row, seed) trainings, in `jobs` processes; rows aggregated in table order."""
  rows_fn, finish, _ = EXPERIMENTS[env.args.exp]
  rows = rows_fn(env)
  if env.args.only:
    rows = [r for r in rows if r[0] in env.args.only]
  out: dict = _resumed(env)
  tasks = [(name, seed) for name, key, _ in rows if name not in out
           for seed in (env.seeds if key else env.seeds[:1])]
  if finish is not None and rows and rows[0][0] in out:  # finish needs its seed-0 params
    tasks.insert(0, (rows[0][0], env.seeds[0]))
  results: dict[tuple[str, int], dict] = {}
  firsts: dict[str, dict] = {}

  def collect(task, res):
    results[task] = res
    name = task[0]
    if name in out and "params" in res:  # a resumed row rerun for its parameters only
      firsts[name] = res
      return
    seeds = [t[1] for t in tasks if t[0] == name]
    if all((name, s) in results for s in seeds):
      runs = [results[(name, s)] for s in seeds]
      out[name] = aggregate([{k: v for k, v in r.items() if k != "params"} for r in runs])
      firsts[name] = runs[0]
      ordered = {n: out[n] for n, _, _ in rows if n in out}
      env.log(ordered, f"{name}: {_fmt(out[name])}")

  if jobs <= 1:
    fns = {n: fn for n, _, fn in rows}
    for task in tasks:
      collect(task, fns[task[0]](env, task[1]))
  else:
    import concurrent.futures as cf
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(jobs, mp.get_context("spawn"), _worker_init,
                                (env.args,)) as pool:
      futures = {pool.submit(_run_task, *task): task for task in tasks}
      for f in cf.as_completed(futures):
        collect(futures[f], f.result())
  out = {n: out[n] for n, _, _ in rows if n in out}
  if finish is not None:
    finish(env, out, firsts)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("exp", choices=list(EXPERIMENTS))
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--lr", type=float, default=LR)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                  help="the first runs every row; the others the key rows (mean ± std)")
  ap.add_argument("--jobs", type=int, default=1,
                  help="worker processes (rows are independent; results do not depend on it)")
  ap.add_argument("--resume", action="store_true",
                  help="keep the rows of an interrupted run's <exp>.partial.json")
  ap.add_argument("--out", default="runs/quant")
  ap.add_argument("--only", nargs="*", default=None, metavar="NAME",
                  help="run only these rows (names as in the table)")
  args = ap.parse_args()
  env = Env(args)
  t0, load0 = time.time(), os.getloadavg()[0]
  out = run_experiment(env, args.jobs)
  table = EXPERIMENTS[args.exp][2](env, out)
  Path(args.out).mkdir(parents=True, exist_ok=True)
  out["_meta"] = {"steps": args.steps, "seq": SEQ, "batch": BATCH, "eval_batches": EVAL_BATCHES,
                  "lr": args.lr, "seeds": list(env.seeds), "jobs": args.jobs,
                  "minutes": round((time.time() - t0) / 60, 1),
                  "load_average_start_end": [round(load0, 1), round(os.getloadavg()[0], 1)],
                  "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "python": platform.python_version(), "jax": jax.__version__}
  Path(args.out, f"{args.exp}.json").write_text(json.dumps(out, indent=1))
  print(table)
  print(f"total {out['_meta']['minutes']} min")
  assert all(math.isfinite(v["bpb"]) for k, v in out.items()
             if not k.startswith("_") and isinstance(v.get("bpb"), float))


if __name__ == "__main__":
  main()
