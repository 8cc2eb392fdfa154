"""Small-scale DeepSeek-V3 / multi-token-prediction experiments on the embedded code corpus.

  python experiments/deepseek/run.py balance      [--steps 300] [--out runs/deepseek]
  python experiments/deepseek/run.py mtp          [--steps 250] [--induction-steps 400]
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
speculative  Self-speculative decoding (`jaxllm.infer.speculative.speculative_decode`) with the
             code-trained n = 4 (and n = 2) models against `greedy_decode` (same model, head 0,
             KV cache), both compiled first, timed per prompt in the same run; outputs compared.

Each writes `<out>/<exp>.json` and PNG plots into `--img` (docs/results/img) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
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


def mtl_config(vocab_size, d_model, n_layers, ffn_dim, seq_len):
  return llama.LlamaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4,
                           n_kv_heads=2, ffn_dim=ffn_dim, tie_embeddings=True,
                           max_seq_len=max(seq_len, 512))


def _head0(model):
  """(params, inputs) -> head-0 logits, without running the other heads."""
  def f(params, inputs_BL):
    z, _ = model.apply({"params": params}, inputs_BL, method="trunk")
    return model.apply({"params": params}, 0, z, method="head_logits")[0]
  return f


def train_mtl(model, batches, steps, lr, pad_id, desc, seed=0):
  """Trains a MultiTokenLlama with the library's summed multi-token loss and train step."""
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))[
      "params"]
  tx = make_optimizer(OptimConfig(lr=lr, warmup_steps=steps // 10), steps)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(seed + 1)))
  step = jax.jit(make_train_step(mt.multi_token_loss_fn(model, pad_id), tx), donate_argnums=(0,))
  losses, t0 = [], time.time()
  for _ in tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True):
    state, m = step(state, next(batches))
    losses.append(m["loss"])
  return state.params, [float(x) for x in jax.device_get(losses)], time.time() - t0


def mtp(args):
  ns = [int(n) for n in args.ns.split(",")]
  out = {"_meta": {"ns": ns}}
  t_all = time.time()
  tok = load_tokenizer("byte")
  img = Path(args.img)
  img.mkdir(parents=True, exist_ok=True)

  # (i) induction
  I = dict(seq=96, batch=32, symbols=args.symbols, seg=args.seg, d=64, layers=2, ffn=192,
           steps=args.induction_steps, lr=args.lr)
  out["_meta"]["induction"] = I
  erng = np.random.default_rng(12345)
  ev = [induction_batch(erng, 64, I["seq"], I["symbols"], I["seg"]) for _ in range(8)]
  ind = {}
  for n in ns:
    model = MultiTokenLlama(mtl_config(tok.vocab_size, I["d"], I["layers"], I["ffn"], I["seq"]), n)
    rng = np.random.default_rng(1000 + 0)  # the same training batches for every n

    def gen(rng=rng):
      while True:
        yield {"tokens": induction_batch(rng, I["batch"], I["seq"], I["symbols"], I["seg"])[0]}
    params, losses, secs = train_mtl(model, gen(), I["steps"], I["lr"], tok.pad_id,
                                     f"induction/n={n}")
    head0 = jax.jit(_head0(model))
    hit = tot = hit_rand = tot_rand = 0.0
    for tokens, mask in ev:
      pred = np.asarray(jnp.argmax(head0(params, tokens[:, :-1]), -1))
      ok = pred == tokens[:, 1:]
      hit += float((ok * mask).sum())
      tot += float(mask.sum())
      other = 1.0 - mask
      other[:, :I["seg"]] = 0.0  # random positions (not copies), away from the start
      hit_rand += float((ok * other).sum())
      tot_rand += float(other.sum())
    ind[n] = {"accuracy_second_occurrence": hit / tot, "accuracy_random_positions":
              hit_rand / tot_rand, "train_loss_sum_heads": losses, "train_seconds": round(secs, 1),
              "params": sum(x.size for x in jax.tree.leaves(params))}
    print(f"induction n={n}: second-occurrence accuracy {hit / tot:.4f} (random positions "
          f"{hit_rand / tot_rand:.4f}, chance {1 / I['symbols']:.4f}) {secs:.0f} s", flush=True)
    out["induction"] = ind
    _save(args, "mtp.partial", out)

  # (ii) code corpus
  C = dict(seq=SEQ, batch=BATCH, d=args.d_model, layers=args.layers, ffn=3 * args.d_model,
           steps=args.steps, lr=args.lr)
  out["_meta"]["code"] = C
  data = DataConfig(source="stdlib", tokenizer="byte")
  evals = list(eval_batches(data, tok, SEQ, BATCH, max_batches=EVAL_BATCHES))
  token_bytes = jnp.asarray(tok.token_bytes(), jnp.float32)
  code = {}
  for n in ns:
    cfg = mtl_config(tok.vocab_size, C["d"], C["layers"], C["ffn"], SEQ)
    model = MultiTokenLlama(cfg, n)
    params, losses, secs = train_mtl(model, train_iterator(data, tok, SEQ, BATCH), C["steps"],
                                     C["lr"], tok.pad_id, f"code/n={n}")
    head0 = _head0(model)

    @jax.jit
    def ev_fn(params, batch, head0=head0):
      inputs_BL, targets_BL = split_tokens(batch["tokens"])
      nll, count = next_token_nll(head0(params, inputs_BL), targets_BL, tok.pad_id)
      n_bytes = jnp.sum(jnp.where(targets_BL != tok.pad_id, token_bytes[targets_BL], 0.0))
      return nll, count, n_bytes
    tot = np.zeros(3)
    for b in evals:
      tot += np.array([float(x) for x in ev_fn(params, b)])
    s = lm_eval.summarize(*tot)
    code[n] = {"heldout_bpb_head0": s["bpb"], "heldout_loss_head0": s["loss"],
               "train_loss_sum_heads": losses, "train_seconds": round(secs, 1),
               "params": sum(x.size for x in jax.tree.leaves(params))}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"mtp_code_n{n}.msgpack").write_bytes(flax.serialization.to_bytes(params))
    print(f"code n={n}: held-out bpb (head 0) {s['bpb']:.4f} {secs:.0f} s", flush=True)
    out["code"] = code
    _save(args, "mtp.partial", out)
  out["_meta"]["minutes"] = round((time.time() - t_all) / 60, 2)
  _save(args, "mtp", out)

  plt = _plt()
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for n in ns:
    ax[0].plot(_smooth(np.array(ind[n]["train_loss_sum_heads"]) / n), label=f"n={n}")
    ax[1].plot(_smooth(np.array(code[n]["train_loss_sum_heads"]) / n), label=f"n={n}")
  ax[0].set(xlabel="step", ylabel="train loss / n (nats, mean over heads)",
            title="Induction task")
  ax[1].set(xlabel="step", ylabel="train loss / n (nats, mean over heads)", title="Code corpus")
  for a in ax:
    a.legend()
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(img / "mtp_training.png", dpi=110)
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
  ax[0].bar([str(n) for n in ns], [ind[n]["accuracy_second_occurrence"] for n in ns])
  ax[0].axhline(1 / I["symbols"], color="k", ls=":", label="chance")
  ax[0].set(xlabel="n (heads)", ylabel="next-token accuracy", title="Induction: 2nd occurrence")
  ax[0].legend()
  ax[1].bar([str(n) for n in ns], [code[n]["heldout_bpb_head0"] for n in ns])
  lo = min(code[n]["heldout_bpb_head0"] for n in ns)
  ax[1].set(xlabel="n (heads)", ylabel="held-out bits/byte (head 0)", title="Code corpus",
            ylim=(lo * 0.9, None))
  fig.tight_layout()
  fig.savefig(img / "mtp_results.png", dpi=110)
  print("| n | induction accuracy, 2nd occurrence | accuracy at random positions | code held-out "
        "bpb (head 0) | params | train s (induction / code) |\n|---|---|---|---|---|---|")
  for n in ns:
    print(f"| {n} | {ind[n]['accuracy_second_occurrence']:.4f} | "
          f"{ind[n]['accuracy_random_positions']:.4f} | {code[n]['heldout_bpb_head0']:.4f} | "
          f"{code[n]['params']:,} | {ind[n]['train_seconds']} / {code[n]['train_seconds']} |")
  print(f"total {out['_meta']['minutes']} min")


# ------------------------------------------------------------------------------- (c) speculative
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


def speculative_exp(args):
  tok, data = load_tokenizer("byte"), DataConfig(source="stdlib", tokenizer="byte")
  meta = json.loads(Path(args.out, "mtp.json").read_text())["_meta"]["code"]
  prompts = code_prompts(tok, data, args.prompts, args.prompt_len)
  out = {"_meta": {"prompts": len(prompts), "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "model": meta,
                   "devices": str(jax.devices())}}
  t_all = time.time()
  N = args.new_tokens
  for n in [int(x) for x in args.ns.split(",")]:
    model = MultiTokenLlama(mtl_config(tok.vocab_size, meta["d"], meta["layers"], meta["ffn"],
                                       SEQ), n)
    template = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
        "params"]
    params = flax.serialization.from_bytes(
        template, Path(args.out, f"mtp_code_n{n}.msgpack").read_bytes())
    # compile both (one prompt length: one compilation each)
    jax.block_until_ready(speculative.greedy_decode(model, params, prompts[0], max_new_tokens=N))
    jax.block_until_ready(speculative.speculative_decode(model, params, prompts[0],
                                                         max_new_tokens=N))
    rows = []
    for i, p in enumerate(tqdm(prompts, desc=f"speculative/n={n}", dynamic_ncols=True)):
      tg, ts = [], []
      for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        t0 = time.perf_counter()
        g = jax.block_until_ready(speculative.greedy_decode(model, params, p, max_new_tokens=N))
        t1 = time.perf_counter()
        s, f = jax.block_until_ready(speculative.speculative_decode(model, params, p,
                                                                    max_new_tokens=N))
        t2 = time.perf_counter()
        tg.append(t1 - t0)
        ts.append(t2 - t1)
      rows.append({"greedy_s": statistics.median(tg), "spec_s": statistics.median(ts),
                   "forwards": int(f), "tokens_per_forward": N / int(f),
                   "identical": bool(np.array_equal(np.asarray(g), np.asarray(s))),
                   "speedup": statistics.median(tg) / statistics.median(ts),
                   "prompt": tok.decode(np.asarray(p[0])[1:]),
                   "output": tok.decode(np.asarray(g)[np.asarray(g) < 256])})
    rep = speculative.benchmark(model, params, prompts, N)  # the library's aggregate, same run
    res = {
        "per_prompt": rows,
        "median_tokens_per_forward": statistics.median(r["tokens_per_forward"] for r in rows),
        "median_speedup": statistics.median(r["speedup"] for r in rows),
        "median_greedy_ms": 1e3 * statistics.median(r["greedy_s"] for r in rows),
        "median_spec_ms": 1e3 * statistics.median(r["spec_s"] for r in rows),
        "all_identical": all(r["identical"] for r in rows) and rep.identical,
        "library_benchmark": {"tokens_per_forward": rep.tokens_per_forward,
                              "speedup": rep.speedup, "greedy_seconds": rep.greedy_seconds,
                              "speculative_seconds": rep.speculative_seconds,
                              "identical": rep.identical},
    }
    # cost of one forward as a function of block length (what a verification forward costs)
    out[f"n={n}"] = res
    print(f"n={n}: median tokens/forward {res['median_tokens_per_forward']:.2f}, median speedup "
          f"{res['median_speedup']:.2f}x (greedy {res['median_greedy_ms']:.1f} ms, speculative "
          f"{res['median_spec_ms']:.1f} ms for {N} tokens); identical: {res['all_identical']}; "
          f"library benchmark: {rep.tokens_per_forward:.2f} tok/fwd, {rep.speedup:.2f}x",
          flush=True)
    _save(args, "speculative.partial", out)
  out["_meta"]["minutes"] = round((time.time() - t_all) / 60, 2)
  _save(args, "speculative", out)

  plt = _plt()
  keys = [k for k in out if not k.startswith("_")]
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
  for k in keys:
    rs = out[k]["per_prompt"]
    ax[0].scatter([r["tokens_per_forward"] for r in rs], [r["speedup"] for r in rs], label=k)
  ax[0].axhline(1.0, color="k", ls=":")
  ax[0].set(xlabel="tokens per forward", ylabel="wall-clock speedup vs greedy",
            title="Per prompt")
  ax[0].legend()
  ax[1].bar(keys, [out[k]["median_speedup"] for k in keys], label="speedup")
  ax[1].bar(keys, [out[k]["median_tokens_per_forward"] for k in keys], alpha=0.4,
            label="tokens / forward")
  ax[1].axhline(2.0, color="r", ls="--", label="2x target")
  ax[1].set(title="Medians over prompts")
  ax[1].legend()
  fig.tight_layout()
  Path(args.img).mkdir(parents=True, exist_ok=True)
  fig.savefig(Path(args.img, "spec_speedup.png"), dpi=110)
  print("| model | median tokens / forward | median speedup | greedy ms | speculative ms | "
        "identical |\n|---|---|---|---|---|---|")
  for k in keys:
    r = out[k]
    print(f"| {k} | {r['median_tokens_per_forward']:.2f} | {r['median_speedup']:.2f}x | "
          f"{r['median_greedy_ms']:.1f} | {r['median_spec_ms']:.1f} | {r['all_identical']} |")
  print(f"total {out['_meta']['minutes']} min")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("exp", choices=["balance", "mtp", "speculative"])
  ap.add_argument("--out", default="runs/deepseek")
  ap.add_argument("--img", default="docs/results/img")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--lr", type=float, default=3e-3)
  # balance
  ap.add_argument("--alpha", type=float, default=1e-2, help="sequence-wise balance loss weight")
  ap.add_argument("--gamma", type=float, default=1e-3, help="bias update speed")
  # mtp
  ap.add_argument("--ns", default="1,2,4")
  ap.add_argument("--induction-steps", type=int, default=400)
  ap.add_argument("--symbols", type=int, default=32)
  ap.add_argument("--seg", type=int, default=12)
  ap.add_argument("--d-model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=3)
  # speculative
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  if args.exp == "speculative" and args.ns == "1,2,4":
    args.ns = "2,4"
  {"balance": balance, "mtp": mtp, "speculative": speculative_exp}[args.exp](args)


if __name__ == "__main__":
  main()
