"""Small-scale DeepSeek-V3 / multi-token-prediction experiments on the embedded code corpus.

  python experiments/deepseek/run.py balance      [--steps 300] [--out runs/deepseek]
  python experiments/deepseek/run.py mtp          [--steps 250] [--induction-steps 400]
  python experiments/deepseek/run.py distill      [--distill-steps 600] [--distill-prompts 1024]
  python experiments/deepseek/run.py speculative  [--prompts 8] [--new-tokens 128]

balance      16-expert DeepSeekMoE (top-2 + 1 shared, sigmoid routing) trained three ways at the
             same steps / batch: no balancing, the sequence-wise balance loss (alpha), and
             auxiliary-loss-free bias balancing (gamma). Logs MaxVio_batch every step, then
             held-out loss / bits per byte and MaxVio_global over the validation batches.
             Uses `jaxllm.objectives.multi_token.deepseek_train_step` (MTP depth 0).
mtp          `MultiTokenLlama` with n = 1, 2, 4 heads on the same trunk, trained with
             `multi_token_loss_fn` through `jaxllm.train.step.make_train_step`; (i) a synthetic
             induction task (random segments that repeat: next-token accuracy on the second
             occurrence), (ii) the stdlib code corpus (held-out bits per byte of head 0). The
             code-trained parameters are saved for `speculative`.
distill      Self-distils the code-trained n = 4 model's draft heads
             (`jaxllm.infer.speculative.distill_draft_heads`): head 0's greedy continuations of
             training-split prompts, heads 1-3 trained on them, trunk and head 0 frozen. Saves
             `<out>/mtp_code_n4_distilled.msgpack`, which `speculative` then also times.
speculative  Self-speculative decoding (`jaxllm.infer.speculative.speculative_decode`) with the
             code-trained n = 4 (and n = 2) models against `greedy_decode` (same model, head 0,
             KV cache), both compiled first, timed per prompt in the same run; outputs compared.

Each writes `<out>/<exp>.json` and PNG plots into `--img` (docs/results/img) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import OptimConfig
from jaxllm.data import DataConfig, eval_batches, load_tokenizer, train_iterator
from jaxllm.eval import lm as lm_eval
from jaxllm.infer import speculative
from jaxllm.models import deepseek as ds
from jaxllm.models import llama
from jaxllm.models.mtp import MultiTokenLlama
from jaxllm.nn.attention import KVCache
from jaxllm.nn import moe
from jaxllm.objectives import multi_token as mt
from jaxllm.objectives.next_token import next_token_nll, split_tokens
from jaxllm.train import metrics
from jaxllm.train.metrics import moving_average, save_json
from jaxllm.train.optim import make_optimizer
from jaxllm.train.step import TrainState, make_train_step

SEQ, BATCH, EVAL_BATCHES = 128, 16, 16


_plt = metrics.pyplot


def _save(args, name, out):
  save_json(args.out, name, out)


def _smooth(x, k=10):
  return moving_average(x, k)


# ----------------------------------------------------------------------------------- (a) balance
def moe_config(vocab_size, **kw):
  """3 layers (first dense, two DeepSeekMoE), d 64, MLA, 16 routed experts top-2 + 1 shared."""
  return ds.tiny(vocab_size, **{**dict(n_routed_experts=16, n_shared_experts=1, moe_dim=32,
                                       top_k=2, n_group=1, topk_group=1, mtp_depth=0,
                                       moe_impl="dense", max_seq_len=SEQ), **kw})


def make_moe_eval(model, pad_id, token_bytes):
  """(variables, batch) -> (nll, tokens, bytes, per-layer loads [n_moe, E]) with the router
  bias applied (the `balance` collection)."""
  token_bytes = jnp.asarray(token_bytes, jnp.float32)

  @jax.jit
  def fn(variables, batch):
    inputs_BL, targets_BL = split_tokens(batch["tokens"])
    (logits_BLV, _), state = model.apply(variables, inputs_BL, mutable=["moe_stats"])
    nll, count = next_token_nll(logits_BLV, targets_BL, pad_id)
    n_bytes = jnp.sum(jnp.where(targets_BL != pad_id, token_bytes[targets_BL], 0.0))
    return nll, count, n_bytes, jnp.stack(moe.layer_loads(state["moe_stats"]))

  return fn


def train_moe(args, tok, data, evals, name, alpha, gamma, seed=0):
  cfg = moe_config(tok.vocab_size, seq_aux_alpha=alpha)
  model = ds.DeepSeek(cfg)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, SEQ), jnp.int32)))
  params, balance = variables["params"], variables["balance"]
  tx = make_optimizer(OptimConfig(lr=args.lr, warmup_steps=args.steps // 10), args.steps)
  opt_state = tx.init(params)
  step = jax.jit(mt.deepseek_train_step(model, tx, tok.pad_id, mtp_lambda=0.0,
                                        bias_gamma=gamma), donate_argnums=(0, 1))
  it = train_iterator(data, tok, SEQ, BATCH)
  hist = []
  t0 = time.time()
  for _ in tqdm(range(args.steps), desc=f"balance/{name}", unit="step", dynamic_ncols=True):
    params, opt_state, balance, m = step(params, opt_state, balance, next(it))
    hist.append(m)
  hist = jax.device_get(hist)
  seconds = time.time() - t0
  fn = make_moe_eval(model, tok.pad_id, tok.token_bytes())
  tot, loads = np.zeros(3), 0.0
  for b in evals:
    nll, count, n_bytes, l = fn({"params": params, "balance": balance}, b)
    tot += np.array([float(nll), float(count), float(n_bytes)])
    loads = loads + np.asarray(l)
  ev = lm_eval.summarize(*tot)
  vio_layers = [float(moe.max_violation(jnp.asarray(l))) for l in loads]
  bias = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v).tolist()
          for path, v in jax.tree_util.tree_flatten_with_path(balance)[0]}
  res = {
      "alpha": alpha, "gamma": gamma, "seed": seed, "train_seconds": round(seconds, 1),
      "params_total": cfg.num_params(), "params_active": cfg.num_params(active=True),
      "maxvio_batch_max": [float(m["maxvio_max"]) for m in hist],
      "maxvio_batch_mean": [float(m["maxvio_mean"]) for m in hist],
      "train_ce": [float(m["main_loss"]) for m in hist],
      "train_objective": [float(m["loss"]) for m in hist],
      "heldout_loss": ev["loss"], "heldout_bpb": ev["bpb"], "heldout_ppl": math.exp(ev["loss"]),
      "heldout_tokens": ev["tokens"],
      "maxvio_global_per_layer": vio_layers, "maxvio_global_mean": float(np.mean(vio_layers)),
      "heldout_loads_per_layer": loads.tolist(), "final_bias": bias,
  }
  tail = max(1, args.steps // 10)
  res["maxvio_batch_last10pct"] = float(np.mean(res["maxvio_batch_mean"][-tail:]))
  return res


def balance(args):
  tok, data = load_tokenizer("byte"), DataConfig(source="stdlib", tokenizer="byte")
  evals = list(eval_batches(data, tok, SEQ, BATCH, max_batches=EVAL_BATCHES))
  variants = [("no balancing", 0.0, 0.0), (f"aux loss (alpha={args.alpha:g})", args.alpha, 0.0),
              (f"loss-free (gamma={args.gamma:g})", 0.0, args.gamma)]
  out = {"_meta": {"steps": args.steps, "seq": SEQ, "batch": BATCH, "lr": args.lr,
                   "eval_batches": EVAL_BATCHES, "config": str(moe_config(tok.vocab_size))}}
  t0 = time.time()
  for name, alpha, gamma in variants:
    out[name] = train_moe(args, tok, data, evals, name, alpha, gamma)
    r = out[name]
    print(f"{name}: held-out loss {r['heldout_loss']:.4f} bpb {r['heldout_bpb']:.4f} "
          f"MaxVio_global {r['maxvio_global_mean']:.3f} batch(last10%) "
          f"{r['maxvio_batch_last10pct']:.3f} ({r['train_seconds']} s)", flush=True)
    _save(args, "balance.partial", out)
  out["_meta"]["minutes"] = round((time.time() - t0) / 60, 2)
  _save(args, "balance", out)

  plt = _plt()
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for name, *_ in variants:
    r = out[name]
    ax[0].plot(np.arange(len(_smooth(r["maxvio_batch_mean"]))) + 1, _smooth(r["maxvio_batch_mean"]),
               label=name)
    ax[1].plot(np.arange(len(_smooth(r["train_ce"]))) + 1, _smooth(r["train_ce"]), label=name)
  ax[0].set(xlabel="step", ylabel="MaxVio_batch (mean over MoE layers, 10-step avg)",
            title="Load imbalance during training")
  ax[1].set(xlabel="step", ylabel="train cross-entropy (nats/token, 10-step avg)",
            title="Language-model loss", ylim=(None, min(4.0, ax[1].get_ylim()[1])))
  for a in ax:
    a.legend()
    a.grid(alpha=0.3)
  fig.tight_layout()
  Path(args.img).mkdir(parents=True, exist_ok=True)
  fig.savefig(Path(args.img, "moe_balancing.png"), dpi=110)
  print("| variant | held-out loss (nats/token) | held-out bpb | ppl | MaxVio_global "
        "(layer 1 / 2) | MaxVio_batch (last 10% of steps) |\n|---|---|---|---|---|---|")
  for name, *_ in variants:
    r = out[name]
    print(f"| {name} | {r['heldout_loss']:.4f} | {r['heldout_bpb']:.4f} | "
          f"{r['heldout_ppl']:.3f} | {' / '.join(f'{v:.3f}' for v in r['maxvio_global_per_layer'])}"
          f" | {r['maxvio_batch_last10pct']:.3f} |")
  if out.get("matmul_us"):
    print("| width d | [M, d] x [d, 3d] float32, us for M = 1 / 2 / 4 | M = 4 over M = 1 |\n"
          "|---|---|---|")
    for d, r in out["matmul_us"].items():
      print(f"| {d} | {' / '.join(f'{t:.1f}' for t in r.values())} | {r['4'] / r['1']:.2f} |")
  print(f"total {out['_meta']['minutes']} min")


# --------------------------------------------------------------------------------------- (b) mtp
def induction_batch(rng, batch, seq_len, n_symbols, seg_len):
  """Random sequences of `seq_len + 1` tokens over `n_symbols` symbols in which one random
  segment of `seg_len` tokens occurs twice. Returns (tokens [B, T], mask [B, T - 1]): mask
  marks the targets tokens[:, 1:] at the second occurrence's positions 1 .. seg_len - 1
  (predictable only by copying the first occurrence; its first token is random)."""
  T = seq_len + 1
  tokens = rng.integers(0, n_symbols, (batch, T), dtype=np.int32)
  mask = np.zeros((batch, seq_len), np.float32)
  for b in range(batch):
    first = rng.integers(0, T // 2 - seg_len)
    second = rng.integers(first + seg_len + 1, T - seg_len + 1)
    tokens[b, second:second + seg_len] = tokens[b, first:first + seg_len]
    mask[b, second:second + seg_len - 1] = 1.0  # target index t predicts tokens[t + 1]
  return tokens, mask


def mtl_config(vocab_size, d_model, n_layers, ffn_dim, seq_len, n_heads=4, n_kv_heads=2):
  return llama.LlamaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                           n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                           tie_embeddings=True, max_seq_len=max(seq_len, 512))


def _heads_fn(model):
  """(params, inputs) -> every head's argmax [n, B, L] (head i predicts token t + 1 + i)."""
  def f(params, inputs_BL):
    logits_NBLV, _ = model.apply({"params": params}, inputs_BL)
    return jnp.argmax(logits_NBLV, axis=-1)
  return f


def _head0(model):
  """(params, inputs) -> head-0 logits, without running the other heads."""
  def f(params, inputs_BL):
    z, _ = model.apply({"params": params}, inputs_BL, method="trunk")
    return model.apply({"params": params}, 0, z, method="head_logits")[0]
  return f


def train_mtl(model, batches, steps, lr, pad_id, desc, seed=0, every=0, evaluate=None):
  """Trains a MultiTokenLlama on the summed multi-token loss through the library's train step,
  with the memory-efficient backward (`multi_token_value_and_grad`). Every `every` steps (and
  at the end) records `evaluate(params)`. -> (params, losses, [(step, eval)], seconds)."""
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))[
      "params"]
  tx = make_optimizer(OptimConfig(lr=lr, warmup_steps=max(1, steps // 20)), steps)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(seed + 1)))
  step = jax.jit(make_train_step(mt.multi_token_loss_fn(model, pad_id), tx,
                                 value_and_grad=mt.multi_token_value_and_grad(model, pad_id)),
                 donate_argnums=(0,))
  losses, curve, t0 = [], [], time.time()
  for i in tqdm(range(1, steps + 1), desc=desc, unit="step", dynamic_ncols=True):
    state, m = step(state, next(batches))
    losses.append(m["loss"])
    if evaluate is not None and (i == steps or (every and i % every == 0)):
      curve.append((i, evaluate(state.params)))
  return state.params, [float(x) for x in jax.device_get(losses)], curve, time.time() - t0


def _steps_to(curve, level):
  """First evaluated step whose accuracy reaches `level` (None if never)."""
  return next((s for s, a in curve if a >= level), None)


def mtp_induction(args, ns):
  I = dict(seq=args.ind_seq, batch=32, symbols=args.symbols, seg=args.seg, layers=2,
           widths=[int(w) for w in args.induction_widths.split(",")],
           seeds=list(range(args.seeds)), steps=args.induction_steps, lr=args.induction_lr,
           eval_every=args.induction_eval_every, eval_sequences=256)
  V, pad = I["symbols"] + 1, I["symbols"]  # symbols 0 .. S-1, pad S (ignored past the end)
  # runs already in <out>/mtp_induction.json with the same settings are kept (resumable)
  res, path = {}, Path(args.out, "mtp_induction.json")
  if path.exists():
    old = json.loads(path.read_text())
    same = lambda m: {k: v for k, v in m.items() if k not in ("seeds", "widths", "minutes",
                                                              "ns")}
    if same(old["_meta"]) == same(I):
      res = old["induction"]
      for k in ("widths", "seeds"):
        I[k] = sorted(set(I[k]) | set(old["_meta"][k]))
  erng = np.random.default_rng(12345)
  ev = [induction_batch(erng, 128, I["seq"], I["symbols"], I["seg"])
        for _ in range(I["eval_sequences"] // 128)]
  for d in I["widths"]:
    for n in ns:
      for seed in I["seeds"]:
        if f"d={d}/n={n}/seed={seed}" in res:
          continue
        model = MultiTokenLlama(mtl_config(V, d, I["layers"], 3 * d, I["seq"]), n)
        rng = np.random.default_rng(1000 + seed)  # the same batches for every n and width

        def gen(rng=rng):
          while True:
            yield {"tokens": induction_batch(rng, I["batch"], I["seq"], I["symbols"],
                                             I["seg"])[0]}
        heads = jax.jit(_heads_fn(model))

        def accuracy(params, heads=heads, n=n):
          """Per head: accuracy on copied tokens. Head i at input position t predicts token
          t + 1 + i; it counts where both t and t + i are copy positions >= 1 (mask[t] and
          mask[t + i]): the model stands inside the copy and its target is copied too."""
          hit, tot = np.zeros(n), np.zeros(n)
          for tokens, mask in ev:
            pred_NBL = np.asarray(heads(params, tokens[:, :-1]))
            L = mask.shape[1]
            for i in range(n):
              m = mask[:, i:] * mask[:, :L - i]
              hit[i] += float(((pred_NBL[i, :, :L - i] == tokens[:, 1 + i:]) * m).sum())
              tot[i] += float(m.sum())
          return (hit / np.maximum(tot, 1)).tolist()
        params, losses, curve, secs = train_mtl(model, gen(), I["steps"], I["lr"], pad,
                                                f"induction/d={d}/n={n}/seed={seed}", seed,
                                                I["eval_every"], accuracy)
        acc0 = [(s, a[0]) for s, a in curve]
        res[f"d={d}/n={n}/seed={seed}"] = {
            "d": d, "n": n, "seed": seed, "accuracy_curve": acc0,
            "final_accuracy": acc0[-1][1], "final_accuracy_per_head": curve[-1][1],
            "steps_to_50": _steps_to(acc0, 0.5), "steps_to_90": _steps_to(acc0, 0.9),
            "train_loss_sum_heads": losses, "train_seconds": round(secs, 1),
            "params": sum(x.size for x in jax.tree.leaves(params))}
        r = res[f"d={d}/n={n}/seed={seed}"]
        print(f"induction d={d} n={n} seed={seed}: accuracy {r['final_accuracy']:.3f} (chance "
              f"{1 / I['symbols']:.3f}), steps to 50% / 90%: {r['steps_to_50']} / "
              f"{r['steps_to_90']}, {secs:.0f} s", flush=True)
        yield I, res
  yield I, res  # also when every run was already there


def mtp_code(args, ns):
  tok = load_tokenizer("byte")
  C = dict(seq=SEQ, batch=BATCH, d=args.d_model, layers=args.layers, ffn=3 * args.d_model,
           steps=args.steps, lr=args.lr, eval_every=args.code_eval_every,
           eval_batches=EVAL_BATCHES, curve_batches=4)
  data = DataConfig(source="stdlib", tokenizer="byte")
  evals = list(eval_batches(data, tok, SEQ, BATCH, max_batches=EVAL_BATCHES))
  token_bytes = jnp.asarray(tok.token_bytes(), jnp.float32)
  res = {}
  for n in ns:
    model = MultiTokenLlama(mtl_config(tok.vocab_size, C["d"], C["layers"], C["ffn"], SEQ), n)

    @jax.jit
    def ev_fn(params, batch, model=model, n=n):
      """head-0 NLL, tokens, bytes; per-head top-1 hits and counts (head i vs token t+1+i)."""
      logits_NBLV, _ = model.apply({"params": params}, batch["tokens"][:, :-1])
      targets_NBL = mt.future_targets(batch["tokens"], n, tok.pad_id)
      nll, count = next_token_nll(logits_NBLV[0], targets_NBL[0], tok.pad_id)
      n_bytes = jnp.sum(jnp.where(targets_NBL[0] != tok.pad_id, token_bytes[targets_NBL[0]],
                                  0.0))
      real_NBL = targets_NBL != tok.pad_id
      hits_N = jnp.sum((jnp.argmax(logits_NBLV, -1) == targets_NBL) & real_NBL, axis=(1, 2))
      return nll, count, n_bytes, hits_N, jnp.sum(real_NBL, axis=(1, 2))

    def evaluate(params, batches):
      tot, hits, counts = np.zeros(3), np.zeros(n), np.zeros(n)
      for b in batches:
        nll, count, n_bytes, h, c = ev_fn(params, b)
        tot += np.array([float(nll), float(count), float(n_bytes)])
        hits += np.asarray(h)
        counts += np.asarray(c)
      return {**lm_eval.summarize(*tot), "head_accuracy": (hits / counts).tolist()}

    params, losses, curve, secs = train_mtl(
        model, train_iterator(data, tok, SEQ, BATCH), C["steps"], C["lr"], tok.pad_id,
        f"code/n={n}", 0, C["eval_every"], lambda p: evaluate(p, evals[:C["curve_batches"]]))
    s = evaluate(params, evals)
    res[n] = {"heldout_bpb_head0": s["bpb"], "heldout_loss_head0": s["loss"],
              "heldout_head_accuracy": s["head_accuracy"],
              "bpb_curve": [(i, e["bpb"]) for i, e in curve],
              "train_loss_sum_heads": losses, "train_seconds": round(secs, 1),
              "params": sum(x.size for x in jax.tree.leaves(params))}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"mtp_code_n{n}.msgpack").write_bytes(flax.serialization.to_bytes(params))
    print(f"code n={n}: held-out bpb (head 0) {s['bpb']:.4f}, head accuracies "
          f"{' / '.join(f'{a:.3f}' for a in s['head_accuracy'])}, {secs:.0f} s", flush=True)
    yield C, res


def mtp(args):
  """Runs the induction and/or code parts; each writes `<out>/mtp_<part>.json` (so the two can
  run as separate processes), then the plots and tables are made from whatever parts exist."""
  ns = [int(n) for n in args.ns.split(",")]
  parts = {"induction": mtp_induction, "code": mtp_code}
  for part in (parts if args.part == "all" else [args.part]):
    t0 = time.time()
    out = {"_meta": {"ns": ns}}
    for meta, res in parts[part](args, ns):
      out["_meta"] = {**meta, "ns": ns}
      out[part] = {str(k): v for k, v in res.items()}
      _save(args, f"mtp_{part}.partial", out)
    out["_meta"]["minutes"] = round((time.time() - t0) / 60, 2)
    _save(args, f"mtp_{part}", out)
    print(f"{part}: {out['_meta']['minutes']} min", flush=True)
  merged = {"_meta": {}}
  for part in parts:
    path = Path(args.out, f"mtp_{part}.json")
    if path.exists():
      r = json.loads(path.read_text())
      merged["_meta"][part], merged[part] = r["_meta"], r[part]
  mtp_report(args, merged)


def mtp_report(args, out):
  """Plots (mtp_induction.png, mtp_code.png) and markdown tables from the parts' JSON (merged)."""
  plt = _plt()
  img = Path(args.img)
  img.mkdir(parents=True, exist_ok=True)
  if "induction" in out:
    I = out["_meta"]["induction"]
    ind = dict(sorted(out["induction"].items(),
                      key=lambda kv: (kv[1]["d"], kv[1]["n"], kv[1]["seed"])))
    widths = I["widths"]
    fig, ax = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4), squeeze=False)
    for a, d in zip(ax[0], widths):
      for key, r in ind.items():
        if r["d"] == d:
          s, acc = zip(*r["accuracy_curve"])
          a.plot(s, acc, color=f"C{[1, 2, 4].index(r['n']) if r['n'] in (1, 2, 4) else 5}",
                 ls=["-", "--", ":"][r["seed"] % 3], label=f"n={r['n']} seed {r['seed']}")
      a.axhline(1 / I["symbols"], color="k", ls=":", lw=0.8, label="chance")
      a.set(xlabel="step", ylabel="head-0 accuracy on copied tokens",
            title=f"Induction, 2 layers, d={d}", ylim=(0, 1.02))
      a.legend(fontsize=8)
      a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img / "mtp_induction.png", dpi=110)
    plt.close(fig)
    print("| width | n | seed | params | accuracy (head 0, copied tokens) | head accuracies "
          "(0 / 1 / ...) | steps to 50% | steps to 90% | train s |\n|---|---|---|---|---|---|"
          "---|---|---|")
    for r in ind.values():
      print(f"| {r['d']} | {r['n']} | {r['seed']} | {r['params']:,} | {r['final_accuracy']:.3f} | "
            f"{' / '.join(f'{a:.3f}' for a in r['final_accuracy_per_head'])} | "
            f"{r['steps_to_50']} | {r['steps_to_90']} | {r['train_seconds']} |")
    groups = {}
    for r in ind.values():
      groups.setdefault((r["d"], r["n"]), []).append(r)
    print("| width | n | seeds | accuracy, mean +- std | steps to 50% (per seed) | steps to 90% "
          "(per seed) |\n|---|---|---|---|---|---|")
    for (d, n), rs in groups.items():
      acc = np.array([r["final_accuracy"] for r in rs])
      print(f"| {d} | {n} | {len(rs)} | {acc.mean():.3f} +- {acc.std():.3f} | "
            f"{', '.join(str(r['steps_to_50']) for r in rs)} | "
            f"{', '.join(str(r['steps_to_90']) for r in rs)} |")
  if "code" in out:
    code = out["code"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in code.items():
      ax[0].plot(*zip(*r["bpb_curve"]), "o-", ms=3, label=f"n={k}")
      ax[1].plot(_smooth(np.array(r["train_loss_sum_heads"]) / int(k), 20), label=f"n={k}")
    ax[0].set(xlabel="step", ylabel="held-out bits/byte, head 0 (4 batches)",
              title="Code corpus: next-token quality")
    ax[1].set(xlabel="step", ylabel="train loss / n (nats, mean over heads, 20-step avg)",
              title="Code corpus: training objective")
    for a in ax:
      a.legend()
      a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img / "mtp_code.png", dpi=110)
    plt.close(fig)
    print("| n | params | held-out bpb (head 0) | held-out top-1 accuracy of head 0 / 1 / 2 / 3 "
          "| train s |\n|---|---|---|---|---|")
    for k, r in code.items():
      print(f"| {k} | {r['params']:,} | {r['heldout_bpb_head0']:.4f} | "
            f"{' / '.join(f'{a:.3f}' for a in r['heldout_head_accuracy'])} | "
            f"{r['train_seconds']} |")


# ------------------------------------------------------------------------------- (c) speculative
def load_code_model(args, n, tok, suffix=""):
  """The code-trained `MultiTokenLlama` with n heads saved by `mtp` in `--out` (and its meta)."""
  meta = json.loads(Path(args.out, "mtp_code.json").read_text())["_meta"]
  model = MultiTokenLlama(mtl_config(tok.vocab_size, meta["d"], meta["layers"], meta["ffn"], SEQ),
                          n)
  template = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
      "params"]
  path = Path(args.out, f"mtp_code_n{n}{suffix}.msgpack")
  if not path.exists():
    raise SystemExit(f"{path} is missing: run `run.py {'distill' if suffix else 'mtp'} "
                     f"--out {args.out}` first.")
  return model, flax.serialization.from_bytes(template, path.read_bytes()), meta


def distill(args):
  """Self-distils the n = 4 model's draft heads on greedy continuations of training prompts
  (the held-out prompts of `speculative` come from the validation files)."""
  tok, data = load_tokenizer("byte"), DataConfig(source="stdlib", tokenizer="byte")
  model, params, meta = load_code_model(args, 4, tok)
  B = 32  # training-split prompts, in another order than the batches the model was trained on
  it = train_iterator(dataclasses.replace(data, seed=1), tok, SEQ, B)
  prompts = [next(it)["tokens"][:, :args.prompt_len] for _ in range(-(-args.distill_prompts //
                                                                      B))]
  cfg = speculative.DistillConfig(max_new_tokens=args.new_tokens, steps=args.distill_steps,
                                  lr=args.distill_lr)
  t0 = time.time()
  new, info = speculative.distill_draft_heads(model, params, prompts, cfg, pad_id=tok.pad_id)
  secs = time.time() - t0
  Path(args.out, "mtp_code_n4_distilled.msgpack").write_bytes(flax.serialization.to_bytes(new))
  seqs = info["sequences"]
  out = {"_meta": {"model": meta, "config": dataclasses.asdict(cfg), "prompts": len(seqs),
                   "prompt_len": args.prompt_len, "minutes": round(secs / 60, 2)},
         "loss": info["loss"],
         "sample": tok.decode(seqs[0][args.prompt_len:][seqs[0][args.prompt_len:] < 256])}
  _save(args, "distill", out)
  print(f"distilled the draft heads on {len(seqs)} greedy continuations: loss per target "
        f"{np.mean(info['loss'][:10]):.3f} -> {np.mean(info['loss'][-10:]):.3f} (first / last 10 "
        f"steps), {secs / 60:.1f} min; sample continuation {out['sample'][:80]!r}", flush=True)


def matmul_costs(widths, rows=(1, 2, 4), iters=200, repeats=5):
  """{d: {M: microseconds}} of one float32 [M, d] x [d, 3d] product inside a compiled scan:
  how a verification block of M tokens costs against one token on this machine, before any
  attention or loop overhead (the roofline question: compute- or weight-read-bound?)."""
  out = {}
  for d in widths:
    W = jax.random.normal(jax.random.key(0), (d, 3 * d))
    out[d] = {}
    for M in rows:
      @jax.jit
      def f(x, W, d=d):
        body = lambda x, _: (x + 1e-6 * (x @ W)[:, :d], None)
        return jax.lax.scan(body, x, None, length=iters)[0]
      x = jnp.ones((M, d))
      jax.block_until_ready(f(x, W))
      best = math.inf
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(x, W))
        best = min(best, time.perf_counter() - t)
      out[d][M] = 1e6 * best / iters
  return out


def code_prompts(tok, data, count, length, seed=0):
  """`count` held-out prompts of `length` byte tokens (bos + text), starting at line starts."""
  rng = np.random.default_rng(seed)
  rows = []
  for b in eval_batches(data, tok, 4 * length, 8, max_batches=count):
    rows.append(b["tokens"][0])
  prompts = []
  for r in rows[:count]:
    text = tok.decode(r[r < 256])
    starts = [i + 1 for i, c in enumerate(text[:len(text) - length]) if c == "\n"]
    s = starts[int(rng.integers(len(starts)))] if starts else 0
    ids = np.concatenate([[tok.bos_id], tok.encode(text[s:])[:length - 1]]).astype(np.int32)
    prompts.append(jnp.asarray(ids[None]))
  return prompts


def forward_costs(model, params, block_lens, cache_len, iters=32, repeats=5):
  """{L: (wall ms, cpu ms)} per forward of the trunk + head 0 + unembedding + argmax over a block
  of L tokens against KV caches of `cache_len` slots: `iters` forwards inside one compiled scan
  (as the decoders run them), the block lengths interleaved, minimum over `repeats`. L = 1 is a
  greedy step; L = n is the verification part of a speculative forward."""
  cfg = model.config
  empty = lambda: KVCache.empty(1, cache_len, cfg.n_kv_heads, cfg.resolved_head_dim,
                                cfg.compute_dtype).replace(length=jnp.int32(cache_len // 2))
  cache = {"trunk": [empty() for _ in range(cfg.n_layers - 1)], "head": empty()}

  def make(L):
    @jax.jit
    def run(params, cache):
      start = cache["head"].length

      def body(cache, i):
        tokens_1L = jnp.full((1, L), i % 200, jnp.int32)
        z, trunk = model.apply({"params": params}, tokens_1L, cache=cache["trunk"],
                               method="trunk")
        logits, head = model.apply({"params": params}, 0, z, None, cache["head"],
                                   method="head_logits")
        keep = start + (jnp.argmax(logits[0, -1]) < 0).astype(jnp.int32)  # data-dependent
        return speculative._set_length({"trunk": trunk, "head": head}, keep), None
      return jax.lax.scan(body, cache, jnp.arange(iters))[0]
    return run

  fns = {L: make(L) for L in block_lens}
  for f in fns.values():
    jax.block_until_ready(f(params, cache))
  best = {L: [math.inf, math.inf] for L in block_lens}
  for _ in range(repeats):
    for L, f in fns.items():
      w, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(f(params, cache))
      best[L] = [min(best[L][0], (time.perf_counter() - w) * 1e3 / iters),
                 min(best[L][1], (time.process_time() - c) * 1e3 / iters)]
  return {L: tuple(v) for L, v in best.items()}


def time_decoders(model, params, prompts, N, repeats):
  """Per prompt: medians over `repeats` of greedy and speculative wall and CPU seconds, timed
  back to back (interleaved), both compiled first; forwards, acceptance counts, identity."""
  greedy = lambda p: speculative.greedy_decode(model, params, p, max_new_tokens=N)
  spec = lambda p: speculative.speculative_decode(model, params, p, max_new_tokens=N)
  jax.block_until_ready(greedy(prompts[0]))
  jax.block_until_ready(spec(prompts[0]))
  rows = []
  for p in prompts:
    t = {k: [] for k in ("gw", "gc", "sw", "sc")}
    for _ in range(repeats):
      w, c = time.perf_counter(), time.process_time()
      g = jax.block_until_ready(greedy(p))
      w1, c1 = time.perf_counter(), time.process_time()
      s, f = jax.block_until_ready(spec(p))
      w2, c2 = time.perf_counter(), time.process_time()
      t["gw"].append(w1 - w), t["gc"].append(c1 - c), t["sw"].append(w2 - w1)
      t["sc"].append(c2 - c1)
    _, f2, accepted = speculative.speculative_decode_stats(model, params, p, max_new_tokens=N)
    med = {k: statistics.median(v) for k, v in t.items()}
    rows.append({"greedy_s": med["gw"], "spec_s": med["sw"], "greedy_cpu_s": med["gc"],
                 "spec_cpu_s": med["sc"], "speedup": med["gw"] / med["sw"],
                 "speedup_cpu": med["gc"] / med["sc"], "forwards": int(f),
                 "tokens_per_forward": N / int(f), "accepted": np.asarray(accepted).tolist(),
                 "identical": bool(np.array_equal(np.asarray(g), np.asarray(s))),
                 "output_ids": np.asarray(g).tolist()})
    assert int(f2) == int(f)
  return rows


def marginal_costs(model, params, prompt, N, repeats):
  """CPU ms of one greedy step and of one speculative forward without the prefill: the
  difference between decoding N and N // 2 tokens (interleaved, minimum over `repeats`),
  divided by the difference in tokens (greedy) or forwards (speculative)."""
  fns = {}
  for m in (N // 2, N):
    fns[("g", m)] = functools.partial(speculative.greedy_decode, model, params, prompt,
                                      max_new_tokens=m)
    fns[("s", m)] = functools.partial(speculative.speculative_decode, model, params, prompt,
                                      max_new_tokens=m)
  out = {k: jax.block_until_ready(f()) for k, f in fns.items()}
  best = {k: math.inf for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      c = time.process_time()
      jax.block_until_ready(f())
      best[k] = min(best[k], time.process_time() - c)
  dg = (best[("g", N)] - best[("g", N // 2)]) / (N - N // 2)
  df = int(out[("s", N)][1]) - int(out[("s", N // 2)][1])
  ds_ = (best[("s", N)] - best[("s", N // 2)]) / max(df, 1)
  return {"greedy_step_ms": 1e3 * dg, "spec_forward_ms": 1e3 * ds_, "ratio": ds_ / dg}


def _acceptance(rows, n):
  """Head j's acceptance rate given drafts 1 .. j-1 accepted, pooled over prompts."""
  forwards = sum(r["forwards"] for r in rows)
  acc = np.sum([r["accepted"] for r in rows], axis=0).astype(float)
  reached = np.concatenate([[forwards], acc[:-1]])
  return (acc / np.maximum(reached, 1)).tolist()


def speculative_exp(args):
  tok, data = load_tokenizer("byte"), DataConfig(source="stdlib", tokenizer="byte")
  meta = json.loads(Path(args.out, "mtp_code.json").read_text())["_meta"]
  prompts = code_prompts(tok, data, args.prompts, args.prompt_len)
  runs = [(f"n={n}", n, "") for n in (int(x) for x in args.ns.split(","))]
  if Path(args.out, "mtp_code_n4_distilled.msgpack").exists():
    _, base, _ = load_code_model(args, 4, tok)
    _, dist, _ = load_code_model(args, 4, tok, "_distilled")
    shared = [k for k in base if k not in ("heads_1", "heads_2", "heads_3")]
    if not all(np.array_equal(a, b) for k in shared for a, b in
               zip(jax.tree.leaves(base[k]), jax.tree.leaves(dist[k]))):
      raise SystemExit(f"{args.out}/mtp_code_n4_distilled.msgpack was distilled from another "
                       f"n = 4 model than mtp_code_n4.msgpack: rerun `run.py distill --out "
                       f"{args.out}`.")
    runs.append(("n=4 distilled", 4, "_distilled"))
  N = args.new_tokens
  out = {"_meta": {"prompts": len(prompts), "prompt_len": args.prompt_len, "new_tokens": N,
                   "repeats": args.repeats, "model": meta, "devices": str(jax.devices()),
                   "xla_flags": os.environ.get("XLA_FLAGS", "")}}
  t_all = time.time()
  cache_len = args.prompt_len + N
  for key, n, suffix in runs:
    model, params, _ = load_code_model(args, n, tok, suffix)
    rows = time_decoders(model, params, prompts, N, args.repeats)
    rep = speculative.benchmark(model, params, prompts, N, repeats=args.repeats)
    costs = forward_costs(model, params, [1, n], cache_len)
    marginal = marginal_costs(model, params, prompts[0], N, args.repeats)
    total = lambda k: sum(r[k] for r in rows)
    forwards = sum(r["forwards"] for r in rows)
    res = {
        "per_prompt": rows,
        "tokens_per_forward": N * len(rows) / forwards,
        "speedup": total("greedy_s") / total("spec_s"),
        "speedup_cpu": total("greedy_cpu_s") / total("spec_cpu_s"),
        "median_prompt_speedup": statistics.median(r["speedup"] for r in rows),
        "acceptance_per_head": _acceptance(rows, n),
        "all_identical": all(r["identical"] for r in rows) and rep.identical,
        # per-forward costs (ms): from the decoders' totals, and the scan measurement
        "greedy_ms_per_token": 1e3 * total("greedy_s") / (N * len(rows)),
        "spec_ms_per_forward": 1e3 * total("spec_s") / forwards,
        "greedy_cpu_ms_per_token": 1e3 * total("greedy_cpu_s") / (N * len(rows)),
        "spec_cpu_ms_per_forward": 1e3 * total("spec_cpu_s") / forwards,
        "forward_ms": {f"L={L}": {"wall": w, "cpu": c} for L, (w, c) in costs.items()},
        "library_benchmark": dataclasses.asdict(rep),
    }
    res["marginal_cpu_ms"] = marginal  # per step / forward, prefill excluded
    res["spec_forward_over_greedy_step_cpu"] = marginal["ratio"]
    res["verify_over_step_cpu"] = costs[n][1] / costs[1][1]
    out[key] = res
    print(f"{key}: tokens/forward {res['tokens_per_forward']:.2f}, speedup {res['speedup']:.2f}x "
          f"wall / {res['speedup_cpu']:.2f}x CPU time; acceptance per draft head "
          f"{' / '.join(f'{a:.2f}' for a in res['acceptance_per_head'])}; a speculative forward "
          f"costs {res['spec_forward_over_greedy_step_cpu']:.2f} greedy steps (its {n}-token "
          f"verification alone {res['verify_over_step_cpu']:.2f}); identical: "
          f"{res['all_identical']}; library benchmark {rep.tokens_per_forward:.2f} tok/fwd, "
          f"{rep.speedup:.2f}x", flush=True)
    _save(args, "speculative.partial", out)

  # what one forward costs at other widths (random weights: costs do not depend on training)
  sweep = {}
  rand_prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, args.prompt_len)),
                            jnp.int32)
  for d in [int(x) for x in args.cost_widths.split(",")] if args.cost_widths else []:
    n = 4
    model = MultiTokenLlama(mtl_config(tok.vocab_size, d, meta["layers"], 3 * d, SEQ,
                                       n_heads=max(4, d // 64), n_kv_heads=max(2, d // 128)), n)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
        "params"]
    # weights x4: predictions vary from token to token, so most drafts are rejected and the
    # marginal cost per forward is measured over many forwards
    params = jax.tree.map(lambda x: 4.0 * x if x.ndim >= 2 else x, params)
    costs = forward_costs(model, params, [1, n], cache_len, iters=16, repeats=3)
    marginal = marginal_costs(model, params, rand_prompt, N, args.repeats)
    sweep[d] = {"params": sum(x.size for x in jax.tree.leaves(params)),
                "forward_ms": {f"L={L}": {"wall": w, "cpu": c} for L, (w, c) in costs.items()},
                "verify_over_step_cpu": costs[n][1] / costs[1][1], "marginal_cpu_ms": marginal,
                "spec_forward_over_greedy_step_cpu": marginal["ratio"]}
    s = sweep[d]
    print(f"cost sweep d={d} ({s['params'] / 1e6:.1f}M params, n=4, random weights): 1-token "
          f"forward {costs[1][1]:.3f} ms CPU, {n}-token {costs[n][1]:.3f} ms "
          f"({s['verify_over_step_cpu']:.2f}x); speculative forward "
          f"{s['spec_forward_over_greedy_step_cpu']:.2f} greedy steps", flush=True)
  out["cost_sweep"] = {str(k): v for k, v in sweep.items()}
  mm = matmul_costs([int(x) for x in args.matmul_widths.split(",")] if args.matmul_widths else [])
  out["matmul_us"] = {str(d): {str(M): t for M, t in r.items()} for d, r in mm.items()}
  out["_meta"]["minutes"] = round((time.time() - t_all) / 60, 2)
  _save(args, "speculative", out)
  speculative_report(args, out)


def speculative_report(args, out):
  plt = _plt()
  keys = [k for k in out if k.startswith("n=")]
  fig, ax = plt.subplots(1, 3, figsize=(15, 4))
  for k in keys:
    rs = out[k]["per_prompt"]
    ax[0].scatter([r["tokens_per_forward"] for r in rs], [r["speedup"] for r in rs],
                  label=f"{k} (wall)")
    ax[0].scatter([r["tokens_per_forward"] for r in rs], [r["speedup_cpu"] for r in rs],
                  marker="x", label=f"{k} (CPU time)")
  ax[0].axhline(1.0, color="k", ls=":")
  ax[0].axhline(2.0, color="r", ls="--", label="2x target")
  ax[0].set(xlabel="tokens per forward", ylabel="speedup vs greedy", title="Per prompt")
  ax[0].legend(fontsize=8)
  for k in keys:
    acc = out[k]["acceptance_per_head"]
    ax[1].plot(range(1, len(acc) + 1), acc, "o-", label=k)
  ax[1].set(xlabel="draft head j (predicts token t + 1 + j)", ylim=(0, 1),
            ylabel="acceptance given drafts < j accepted", title="Draft acceptance")
  ax[1].legend()
  labels, step, verify, spec = [], [], [], []
  for k in keys:
    r = out[k]
    labels.append(f"trained {k}\nd={out['_meta']['model']['d']}".replace(" distilled",
                                                                          "\ndistilled"))
    step.append(1.0)
    verify.append(r["verify_over_step_cpu"])
    spec.append(r["spec_forward_over_greedy_step_cpu"])
  for d, r in out.get("cost_sweep", {}).items():
    labels.append(f"random n=4\nd={d}")
    step.append(1.0)
    verify.append(r["verify_over_step_cpu"])
    spec.append(r["spec_forward_over_greedy_step_cpu"])
  x = np.arange(len(labels))
  ax[2].bar(x - 0.2, verify, 0.4, label="n-token verification (trunk + head 0)")
  ax[2].bar(x + 0.2, spec, 0.4, label="whole speculative forward (+ drafts, loop)")
  ax[2].axhline(1.0, color="k", ls=":", label="greedy step = 1")
  ax[2].set_xticks(x, labels, fontsize=8)
  ax[2].set(ylabel="cost in greedy steps (CPU time)", title="What one forward costs")
  ax[2].legend(fontsize=8)
  for a in ax:
    a.grid(alpha=0.3)
  fig.tight_layout()
  Path(args.img).mkdir(parents=True, exist_ok=True)
  fig.savefig(Path(args.img, args.img_name), dpi=110)
  plt.close(fig)
  print("| model | tokens / forward | acceptance per draft head | speedup (wall) | speedup (CPU "
        "time) | greedy step ms (CPU) | speculative forward ms (CPU) | forward cost in greedy "
        "steps (verification / whole) | identical |\n|---|---|---|---|---|---|---|---|---|")
  for k in keys:
    r = out[k]
    print(f"| {k} | {r['tokens_per_forward']:.2f} | "
          f"{' / '.join(f'{a:.2f}' for a in r['acceptance_per_head'])} | {r['speedup']:.2f}x | "
          f"{r['speedup_cpu']:.2f}x | {r['marginal_cpu_ms']['greedy_step_ms']:.3f} | "
          f"{r['marginal_cpu_ms']['spec_forward_ms']:.3f} | {r['verify_over_step_cpu']:.2f} / "
          f"{r['spec_forward_over_greedy_step_cpu']:.2f} | {r['all_identical']} |")
  if out.get("cost_sweep"):
    print("| width (n=4, random weights) | params | 1-token forward ms (CPU) | 4-token forward "
          "ms (CPU) | ratio | speculative forward / greedy step |\n|---|---|---|---|---|---|")
    for d, r in out["cost_sweep"].items():
      f = r["forward_ms"]
      print(f"| {d} | {r['params'] / 1e6:.1f}M | {f['L=1']['cpu']:.3f} | {f['L=4']['cpu']:.3f} | "
            f"{r['verify_over_step_cpu']:.2f} | {r['spec_forward_over_greedy_step_cpu']:.2f} |")
  if out.get("matmul_us"):
    print("| width d | [M, d] x [d, 3d] float32, us for M = 1 / 2 / 4 | M = 4 over M = 1 |\n"
          "|---|---|---|")
    for d, r in out["matmul_us"].items():
      print(f"| {d} | {' / '.join(f'{t:.1f}' for t in r.values())} | {r['4'] / r['1']:.2f} |")
  print(f"total {out['_meta']['minutes']} min")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("exp", choices=["balance", "mtp", "distill", "speculative"])
  ap.add_argument("--out", default="runs/deepseek")
  ap.add_argument("--img", default="docs/results/img")
  ap.add_argument("--steps", type=int, default=None, help="default: balance 300, mtp code 800")
  ap.add_argument("--lr", type=float, default=3e-3)
  # balance
  ap.add_argument("--alpha", type=float, default=1e-2, help="sequence-wise balance loss weight")
  ap.add_argument("--gamma", type=float, default=1e-3, help="bias update speed")
  # mtp
  ap.add_argument("--ns", default="1,2,4")
  ap.add_argument("--part", choices=["all", "induction", "code"], default="all")
  ap.add_argument("--induction-steps", type=int, default=1000)
  ap.add_argument("--induction-lr", type=float, default=1e-3)
  ap.add_argument("--induction-widths", default="32,64")
  ap.add_argument("--induction-eval-every", type=int, default=50)
  ap.add_argument("--seeds", type=int, default=1, help="induction seeds per (width, n)")
  ap.add_argument("--ind-seq", type=int, default=64)
  ap.add_argument("--symbols", type=int, default=32)
  ap.add_argument("--seg", type=int, default=24)
  ap.add_argument("--d-model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--code-eval-every", type=int, default=100)
  # speculative
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--cost-widths", default="128,256,512",
                  help="widths of random-weight n=4 models whose forward costs are measured")
  ap.add_argument("--matmul-widths", default="128,512,1024",
                  help="widths d of the [M, d] x [d, 3d] timing (M = 1, 2, 4); empty: skip")
  ap.add_argument("--img-name", default="spec_speedup.png")
  # distill
  ap.add_argument("--distill-steps", type=int, default=600)
  ap.add_argument("--distill-prompts", type=int, default=1024)
  ap.add_argument("--distill-lr", type=float, default=1e-3)
  args = ap.parse_args()
  if args.exp == "speculative" and args.ns == "1,2,4":
    args.ns = "2,4"
  if args.steps is None:
    args.steps = {"balance": 300, "mtp": 800}.get(args.exp, 0)
  {"balance": balance, "mtp": mtp, "distill": distill,
   "speculative": speculative_exp}[args.exp](args)


if __name__ == "__main__":
  main()
