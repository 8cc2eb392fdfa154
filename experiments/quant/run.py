"""Small-scale reproductions of ParetoQ, QuEST and MatQuant claims on the embedded corpus.

  python experiments/quant/run.py paretoq  [--steps 150] [--out runs/quant] [--only NAME ...]
  python experiments/quant/run.py quest    [--steps 150]
  python experiments/quant/run.py matquant [--steps 150]

Each writes `<out>/<exp>.json` and prints a markdown table (held-out bits per byte on the
stdlib corpus's validation split, byte tokenizer; model bytes from `quantize_params`). The model is
a 4-layer Llama (d 128, FFN 384, 4 heads / 2 KV heads, tied embeddings), trained with AdamW,
warmup + cosine, on 16 x 128-token batches. Everything quantized is a transform of the unchanged
model (`jaxllm.quant` policies); embeddings and norms stay float32.
"""

from __future__ import annotations

import argparse
import json
import math
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

SEQ, BATCH, EVAL_BATCHES, LR = 128, 16, 16, 3e-3
LAYERS = r"layers_\d+/(attn|mlp)/.*"


class Env:

  def __init__(self, args):
    self.args = args
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

  def schedule(self, steps, warmup=None):
    warmup = warmup or max(1, steps // 10)
    return optax.warmup_cosine_decay_schedule(0.0, LR, warmup, steps, LR * 0.1)

  def optimizer(self, steps, switch_policy=None, qat_fraction=0.1):
    """AdamW on weights (decay on matrices), Adam on ParetoQ scales (no decay). With a
    `switch_policy`, full precision then QAT with a fresh warmup + cosine (ParetoQ starts QAT
    from a trained FP model with its own schedule)."""
    if switch_policy is None:
      sched = self.schedule(steps)
    else:
      fp = round((1 - qat_fraction) * steps)
      sched = optax.join_schedules([self.schedule(fp), self.schedule(steps - fp)], [fp])
    weights = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(sched, weight_decay=0.1, mask=decay_mask))
    tx = qt.with_scale_optimizer(weights, optax.adam(sched))
    if switch_policy is not None:
      tx = optax.chain(tx, qt.qat_switch(steps, switch_policy, qat_fraction))
    return tx

  def train(self, model, tx, loss_fn=None, steps=None, seed=0):
    steps = steps or self.args.steps
    loss_fn = loss_fn or lm_loss_fn(model, self.tok.pad_id)
    example = jnp.zeros((1, SEQ), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), example))["params"]
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(seed + 1)))
    step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=(0,))
    it = train_iterator(self.data, self.tok, SEQ, BATCH)
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


def _row(name, bpb, report, extra=""):
  return (f"| {name} | {bpb:.4f} | {report.total_bytes:,} | "
          f"{report.quantized_bits_per_weight:.2f} | {extra} |")


def paretoq(env):
  rows, out = [], {}
  params, info = env.train(env.model, env.optimizer(env.args.steps))
  fp_bpb, fp_size = env.bpb(env.model, params), env.size(params)
  out["fp32"] = {"bpb": fp_bpb, "bytes": fp_size.total_bytes, **info}
  rows.append(f"| fp32 | {fp_bpb:.4f} | {fp_size.total_bytes:,} | 32 | "
              f"{info['train_loss_last10']:.3f} |")
  env.log(out, rows[-1])
  variants = [(f"{b}-bit {how}", quant.paretoq(b), how) for b in (1, 1.58, 2, 3, 4)
              for how in ("QAT last 10%", "QAT from scratch")]
  variants += [("2-bit min-max (no learned scale), QAT last 10%", quant.minmax(2),
                "QAT last 10%")]
  if env.args.only:
    variants = [v for v in variants if v[0] in env.args.only]
  for name, spec, how in variants:
    gated = how == "QAT last 10%"
    policy = quant.Policy((quant.Rule(LAYERS, spec),), qat_gate=gated)
    model = policy.apply(env.model)
    params, info = env.train(model, env.optimizer(env.args.steps, policy if gated else None))
    bpb, rep = env.bpb(model, params), env.size(params, policy)
    out[name] = {"bpb": bpb, "bytes": rep.total_bytes,
                 "quantized_bpw": rep.quantized_bits_per_weight, **info}
    rows.append(_row(name, bpb, rep, f"{info['train_loss_last10']:.3f}"))
    env.log(out, rows[-1])
  header = [("| model | held-out bpb | model bytes | bits/weight (quantized layers) | "
             "train loss (last 10 steps) |"), "|---|---|---|---|---|"]
  return out, "\n".join(header + rows)


def _cos(a, b):
  a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _layer_kernels(grads, i):
  layer = grads[f"layers_{i}"]
  return [np.asarray(layer[g][n]["kernel"]) for g in ("attn", "mlp") for n in layer[g]]


def quest(env):
  rows, out = [], {}
  fp_params, info = env.train(env.model, env.optimizer(env.args.steps))
  out["fp32"] = {"bpb": env.bpb(env.model, fp_params), **info}
  rows.append(f"| fp32 | {out['fp32']['bpb']:.4f} | | |")
  batch = env.eval[0]
  fp_loss = lm_loss_fn(env.model, env.tok.pad_id)
  g_fp = jax.jit(jax.grad(lambda p: fp_loss(p, batch, None)[0]))(fp_params)
  variants = {"QuEST (Hadamard + trust)": {}, "no Hadamard (trust)": {"hadamard_block": None},
              "plain STE (Hadamard)": {"trust_scale": None}}
  for bits in (4, 2, 1):
    for vname, kw in variants.items():
      spec = quant.quest(bits, **{"hadamard_block": 128, **kw})
      policy = quant.Policy((quant.Rule(LAYERS, spec, spec),))
      model = policy.apply(env.model)
      params, info = env.train(model, env.optimizer(env.args.steps))
      bpb = env.bpb(model, params)
      # gradient alignment at the FP-trained weights: quantized vs full-precision gradient
      ql = lm_loss_fn(model, env.tok.pad_id)
      g_q = jax.jit(jax.grad(lambda p, ql=ql: ql(p, batch, None)[0]))(fp_params)
      cos = [_cos(_layer_kernels(g_q, i), _layer_kernels(g_fp, i))
             for i in range(env.cfg.n_layers)]
      name = f"W{bits}A{bits} {vname}"
      out[name] = {"bpb": bpb, "grad_cosine_per_layer": cos, **info}
      rows.append(f"| {name} | {bpb:.4f} | {' / '.join(f'{c:.3f}' for c in cos)} |")
      env.log(out, rows[-1])
  header = ["| model | held-out bpb | grad cosine vs FP, layers 0 / 1 / 2 / 3 |", "|---|---|---|"]
  rows[0] = f"| fp32 | {out['fp32']['bpb']:.4f} | 1 |"
  return out, "\n".join(header + rows)


def matquant(env):
  out, rows = {}, []
  widths = (8, 6, 4, 3, 2)

  def evals(params):
    return {r: env.bpb(mq.width_policy(r, LAYERS).apply(env.model), params) for r in widths}

  joint, info = env.train(env.model, env.optimizer(env.args.steps),
                          mq.joint_loss_fn(env.model, env.tok.pad_id, {8: 1.0, 4: 1.0, 2: 1.0},
                                           LAYERS))
  out["MatQuant joint (8, 4, 2)"] = {"bpb": evals(joint), **info}
  env.log(out, str(out["MatQuant joint (8, 4, 2)"]))
  int8, info = env.train(mq.width_policy(8, LAYERS).apply(env.model), env.optimizer(env.args.steps))
  out["int8 QAT, sliced naively"] = {"bpb": evals(int8), **info}
  env.log(out, str(out["int8 QAT, sliced naively"]))
  sep = {}
  for r in (4, 2):
    m = mq.width_policy(r, LAYERS).apply(env.model)
    p, info = env.train(m, env.optimizer(env.args.steps))
    sep[r] = env.bpb(m, p)
    env.log(out, f"separate int{r}: {sep[r]:.4f} {info}")
  sep[8] = out["int8 QAT, sliced naively"]["bpb"][8]
  out["separately trained"] = {"bpb": sep}
  header = ["| model | " + " | ".join(f"int{r}" for r in widths) + " |",
            "|---|" + "---|" * len(widths)]
  for name, v in out.items():
    rows.append(f"| {name} | " + " | ".join(
        f"{v['bpb'][r]:.4f}" if r in v["bpb"] else "-" for r in widths) + " |")
  mix = {r"layers_[01]/.*": 8, r"layers_[23]/attn/.*": 4, r"layers_[23]/mlp/.*": 2}
  pol = mq.width_policy(mix)
  rep = env.size(joint, pol)
  mix_bpb = env.bpb(pol.apply(env.model), joint)
  out["mix_n_match"] = {"bpb": mix_bpb, "bytes": rep.total_bytes,
                        "quantized_bpw": rep.quantized_bits_per_weight}
  rows.append(f"\nMix'n'Match of the joint model (layers 0-1 int8, 2-3 attention int4 / MLP "
              f"int2): bpb {mix_bpb:.4f}, "
              f"{rep.quantized_bits_per_weight:.2f} bits/weight over quantized layers "
              f"(scales and zero points included).")
  return out, "\n".join(header + rows)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("exp", choices=["paretoq", "quest", "matquant"])
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--out", default="runs/quant")
  ap.add_argument("--only", nargs="*", default=None, metavar="NAME",
                  help="paretoq: run the FP model and only these variants (names as in the table)")
  args = ap.parse_args()
  env = Env(args)
  t0 = time.time()
  out, table = {"paretoq": paretoq, "quest": quest, "matquant": matquant}[args.exp](env)
  Path(args.out).mkdir(parents=True, exist_ok=True)
  out["_meta"] = {"steps": args.steps, "seq": SEQ, "batch": BATCH, "eval_batches": EVAL_BATCHES,
                  "minutes": round((time.time() - t0) / 60, 1), "lr": LR}
  Path(args.out, f"{args.exp}.json").write_text(json.dumps(out, indent=1))
  print(table)
  print(f"total {out['_meta']['minutes']} min")
  assert all(math.isfinite(v["bpb"]) for k, v in out.items()
             if not k.startswith("_") and isinstance(v.get("bpb"), float))


if __name__ == "__main__":
  main()
