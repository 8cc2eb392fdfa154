"""Small-scale LLaDA (masked diffusion) experiments: reversal curse, sampler ablation, likelihood.

  python experiments/llada/run.py reversal    [--facts 150] [--steps 3000] [--seeds 1]
  python experiments/llada/run.py sampler     [--steps 1200] [--digits 8] [--task sort|shuffle]
  python experiments/llada/run.py likelihood  [--steps 400] [--md-multiple 3]

reversal    Synthetic facts "[name] is [attribute]" (BOS n1 n2 IS a1 a2 EOS; names and attributes
            are distinct pairs over two disjoint 24-token alphabets, a random bijection) trained
            *forward only* into a masked-diffusion model (`masked_diffusion_loss_fn`) and into an
            autoregressive model (`lm_loss_fn`) with the same Llama blocks (causal vs
            bidirectional attention), the same init seed, steps, batches and optimizer. Then every
            fact is queried forward (name -> attribute) and backward (attribute -> name):
              - ranking: the answer among all N candidates by the model's conditional
                log-likelihood of the answer tokens (chance 1/N). AR: teacher-forced log p(answer |
                prefix), forward prefix "BOS n IS", backward prefix "BOS a IS" (the only way a
                left-to-right model can be given the attribute first). MD: the answer positions
                masked *in place* in the training template (forward "BOS n IS _ _ EOS", backward
                "BOS _ _ IS a EOS") and scored by LLaDA's likelihood estimator, computed exactly by
                enumerating every mask subset of the 2 answer positions (no Monte Carlo noise; the
                test checks it against `jaxllm.eval.likelihood.log_likelihood`).
              - generation: greedy exact match of both answer tokens. AR: `jaxllm.infer.sampling.
                generate` after the same prefixes. MD forward: `jaxllm.infer.diffusion.generate`
                after "BOS n IS" (gen 3 = a1 a2 EOS, 3 steps); MD in place (both directions):
                low-confidence unmasking of the 2 answer positions, one token per step.
              - AR "joint" (not a backward query): argmax_n log p(BOS n IS a EOS), i.e. running the
                forward direction once per candidate name (Bayes inversion by brute force).
sampler     One masked-diffusion model SFT-trained (`sft_loss_fn`) to sort D random digits
            (prompt BOS d_1..d_D SEP, response the sorted digits; `--task shuffle`: any
            permutation of them), then `diffusion.generate` on held-out prompts for every
            steps x block_length x remasking setting: exact-match (shuffle: valid-permutation)
            and per-digit accuracy (shuffle: multiset overlap).
likelihood  The same Llama shape trained on the embedded code corpus (byte tokenizer) as an AR
            model and as a masked-diffusion model, same steps, batch, data order and optimizer;
            held-out bits per byte: AR exact (`jaxllm.eval.lm.make_eval_fn`) vs the MD Monte Carlo
            upper bound (`make_masked_diffusion_eval_fn` -> `sequence_nll_bound`), at several step
            counts; the MD model then keeps training to `--md-multiple` x the AR's steps.

Each writes `<out>/<exp>.json` (default runs/llada) and `docs/results/img/llada_<exp>*.png`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import OptimConfig
from jaxllm.data import DataConfig, eval_batches, load_tokenizer, train_iterator
from jaxllm.eval import lm as lm_eval
from jaxllm.infer import diffusion, sampling
from jaxllm.models import llada, llama
from jaxllm.objectives import masked_diffusion as md
from jaxllm.train import metrics
from jaxllm.train.metrics import moving_average, save_json
from jaxllm.train.optim import make_optimizer
from jaxllm.train.step import TrainState, lm_loss_fn, make_train_step


_plt = metrics.pyplot


def _save(args, name, out):
  save_json(args.out, name, out)


def _smooth(x, k=20):
  return moving_average(x, k)


def _plot_losses(fig, ax, args, png, ar_losses, md_losses, labels):
  """Right panel: both models' smoothed train losses; then grid, layout and save under args.img."""
  ax[1].plot(_smooth(ar_losses), label="AR (next-token CE)")
  ax[1].plot(_smooth(md_losses), label="MD (LLaDA loss, CE / p_mask per token)")
  ax[1].set(xlabel="step", **labels)
  ax[1].legend()
  for a in ax:
    a.grid(alpha=0.3)
  fig.tight_layout()
  Path(args.img).mkdir(parents=True, exist_ok=True)
  fig.savefig(Path(args.img, png), dpi=110)


def make_config(vocab_size, d_model, n_layers, seq_len, causal):
  """The same Llama shape for both models; only the attention mask differs."""
  cfg = llama.LlamaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                          n_heads=4, n_kv_heads=4, ffn_dim=3 * d_model, tie_embeddings=True,
                          max_seq_len=seq_len)
  return cfg if causal else llada.bidirectional(cfg)


def init_params(model, seed, seq_len):
  return nn.unbox(jax.jit(model.init)(jax.random.key(seed),
                                      jnp.zeros((1, seq_len), jnp.int32)))["params"]


class Trainer:
  """The library's jitted train step (`make_train_step`) around any `loss_fn`, AdamW + cosine."""

  def __init__(self, model, loss_fn, steps, lr, seed, seq_len, warmup=None):
    params = init_params(model, seed, seq_len)
    self.tx = make_optimizer(OptimConfig(lr=lr, warmup_steps=warmup or max(1, steps // 10)),
                             steps)
    self.state = TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params),
                            jax.random.key_data(jax.random.key(seed + 1)))
    self.step = jax.jit(make_train_step(loss_fn, self.tx), donate_argnums=(0,))
    self.losses, self.seconds = [], 0.0
    self.params_count = sum(int(x.size) for x in jax.tree.leaves(params))

  def run(self, batches, n, desc):
    t0, losses = time.time(), []
    for _ in tqdm(range(n), desc=desc, unit="step", dynamic_ncols=True):
      self.state, m = self.step(self.state, next(batches))
      losses.append(m["loss"])
    self.losses += [float(x) for x in jax.device_get(losses)]
    self.seconds += time.time() - t0

  @property
  def params(self):
    return self.state.params


# ==================================================================================== reversal
R_BOS, R_IS, R_EOS, R_MASK = 0, 1, 2, 3
R_SPECIAL = 4
NAME_POS, ATTR_POS = (1, 2), (4, 5)


def build_facts(n_facts, alphabet, seed=0):
  """(names [N, 2], attributes [N, 2], train tokens [N, 7]). Name tokens are R_SPECIAL ..
  R_SPECIAL + alphabet - 1, attribute tokens the next `alphabet` ids; both are distinct pairs.
  The training set holds only the forward sentences BOS n1 n2 IS a1 a2 EOS."""
  if n_facts > alphabet * alphabet:
    raise ValueError(f"{n_facts} facts need more than {alphabet}^2 distinct pairs.")
  rng = np.random.default_rng(seed)
  pairs = np.array(list(itertools.product(range(alphabet), repeat=2)), np.int32)
  names = pairs[rng.choice(len(pairs), n_facts, replace=False)] + R_SPECIAL
  attrs = pairs[rng.choice(len(pairs), n_facts, replace=False)] + R_SPECIAL + alphabet
  col = lambda v: np.full((n_facts, 1), v, np.int32)
  train = np.concatenate([col(R_BOS), names, col(R_IS), attrs, col(R_EOS)], axis=1)
  return names, attrs, train


def fact_batches(train, batch, seed):
  rng = np.random.default_rng(seed)
  while True:
    yield {"tokens": train[rng.integers(0, len(train), batch)]}


def ar_answer_logprob(model, params, prefix_BP, answer_BA):
  """Teacher-forced log p(answer | prefix) of an autoregressive model, float[B]."""
  seq = jnp.concatenate([prefix_BP, answer_BA], axis=1)
  logp = jax.nn.log_softmax(model.apply({"params": params}, seq[:, :-1])[0].astype(jnp.float32))
  P, A = prefix_BP.shape[1], answer_BA.shape[1]
  tgt = seq[:, P:]
  lp = jnp.take_along_axis(logp[:, P - 1:P - 1 + A], tgt[..., None], axis=-1)[..., 0]
  return jnp.sum(lp, axis=1)


def ar_sequence_logprob(model, params, seq_BT):
  """log p(seq[1:] | seq[0]) of an autoregressive model (the whole sentence), float[B]."""
  return ar_answer_logprob(model, params, seq_BT[:, :1], seq_BT[:, 1:])


def mask_subsets(n):
  """Every non-empty subset S of n answer positions with LLaDA's estimator weight
  P(l = |S|) P(S | l) * (n / l) = 1 / (n C(n, l)) * n / l: (masks bool[S, n], weights [S])."""
  masks, weights = [], []
  for l in range(1, n + 1):
    for S in itertools.combinations(range(n), l):
      m = np.zeros(n, bool)
      m[list(S)] = True
      masks.append(m)
      weights.append(1.0 / (n * math.comb(n, l)) * n / l)
  return np.array(masks), np.array(weights, np.float32)


def md_exact_bound(model, params, seq_BT, positions, mask_id):
  """LLaDA's likelihood estimator of -log p(seq[positions] | the rest) (the expectation over
  l ~ U{1..n} and a uniform l-subset of the n answer positions of (n / l) sum_masked CE),
  evaluated exactly by enumerating the subsets; float[B] (an upper bound on the NLL)."""
  masks_Sn, w_S = mask_subsets(len(positions))
  S = len(w_S)
  B, T = seq_BT.shape
  full_mask = np.zeros((S, T), bool)
  full_mask[:, positions] = masks_Sn
  full_mask = jnp.asarray(full_mask)
  noisy = jnp.where(full_mask[None], mask_id, seq_BT[:, None, :]).reshape(B * S, T)
  logp = jax.nn.log_softmax(model.apply({"params": params}, noisy)[0].astype(jnp.float32))
  logp = logp.reshape(B, S, T, -1)
  ce = -jnp.take_along_axis(logp, jnp.broadcast_to(seq_BT[:, None, :, None], (B, S, T, 1)),
                            axis=-1)[..., 0]
  per_S = jnp.sum(jnp.where(full_mask[None], ce, 0.0), axis=2)
  return jnp.sum(per_S * jnp.asarray(w_S)[None], axis=1)


def md_infill_greedy(model, params, seq_BT, positions, mask_id):
  """Masks `positions` and unmasks them one per step, most confident first (the sampler's
  low-confidence rule at temperature 0, one token per step), int[B, len(positions)]."""
  pos = jnp.asarray(positions)
  x = seq_BT.at[:, pos].set(mask_id)
  V = model.config.vocab_size
  for _ in positions:
    logits = model.apply({"params": params}, x)[0][:, pos].astype(jnp.float32)
    logits = jnp.where((jnp.arange(V) == mask_id)[None, None, :], -jnp.inf, logits)
    p = jax.nn.softmax(logits, -1)
    x0, conf = jnp.argmax(p, -1), jnp.max(p, -1)
    masked = x[:, pos] == mask_id
    conf = jnp.where(masked, conf, -jnp.inf)
    pick = jnp.argmax(conf, axis=1)
    sel = (jnp.arange(len(positions))[None] == pick[:, None]) & masked
    x = x.at[:, pos].set(jnp.where(sel, x0, x[:, pos]))
  return x[:, pos]


def _rank_accuracy(score_fn, n, chunk):
  """score_fn(query_idx [q]) -> scores [q, n] over all n candidates; accuracy of argmax == i."""
  hits = 0
  for s in range(0, n, chunk):
    q = np.arange(s, min(n, s + chunk))
    scores = np.asarray(score_fn(q))
    hits += int(np.sum(np.argmax(scores, axis=1) == q))
  return hits / n


def reversal_eval(ar, ar_params, mdl, md_params, names, attrs, chunk=20):
  N = len(names)
  names_j, attrs_j = jnp.asarray(names), jnp.asarray(attrs)
  col = lambda v, b: jnp.full((b, 1), v, jnp.int32)

  def ar_answer_scores(given_j, answers_j):
    @jax.jit
    def fn(q):  # log p(answer' | BOS given_q IS) for every candidate answer'
      b = q.shape[0]
      prefix = jnp.concatenate([col(R_BOS, b), given_j[q], col(R_IS, b)], 1)
      pre = jnp.repeat(prefix, N, axis=0)
      return ar_answer_logprob(ar, ar_params, pre, jnp.tile(answers_j, (b, 1))).reshape(b, N)
    return fn

  ar_fwd_scores = ar_answer_scores(names_j, attrs_j)  # log p(a' | BOS n_q IS)
  ar_bwd_scores = ar_answer_scores(attrs_j, names_j)  # log p(n' | BOS a_q IS)

  @jax.jit
  def ar_joint_scores(q):  # log p(BOS n' IS a_q EOS) for all n'
    b = q.shape[0]
    seq = jnp.concatenate([col(R_BOS, b * N), jnp.tile(names_j, (b, 1)), col(R_IS, b * N),
                           jnp.repeat(attrs_j[q], N, axis=0), col(R_EOS, b * N)], 1)
    return ar_sequence_logprob(ar, ar_params, seq).reshape(b, N)

  def template(n, a):
    b = n.shape[0]
    return jnp.concatenate([col(R_BOS, b), n, col(R_IS, b), a, col(R_EOS, b)], 1)

  @jax.jit
  def md_fwd_scores(q):  # -bound of a' in place given BOS n_q IS _ _ EOS
    b = q.shape[0]
    seq = template(jnp.repeat(names_j[q], N, axis=0), jnp.tile(attrs_j, (b, 1)))
    return -md_exact_bound(mdl, md_params, seq, ATTR_POS, R_MASK).reshape(b, N)

  @jax.jit
  def md_bwd_scores(q):  # -bound of n' in place given BOS _ _ IS a_q EOS
    b = q.shape[0]
    seq = template(jnp.tile(names_j, (b, 1)), jnp.repeat(attrs_j[q], N, axis=0))
    return -md_exact_bound(mdl, md_params, seq, NAME_POS, R_MASK).reshape(b, N)

  res = {"chance": 1.0 / N}
  for key, fn in [("ar_forward_rank", ar_fwd_scores), ("ar_backward_rank", ar_bwd_scores),
                  ("ar_joint_rank", ar_joint_scores), ("md_forward_rank", md_fwd_scores),
                  ("md_backward_rank", md_bwd_scores)]:
    res[key] = _rank_accuracy(fn, N, chunk)

  # generation (greedy exact match of both answer tokens)
  fwd_prefix = jnp.concatenate([col(R_BOS, N), names_j, col(R_IS, N)], 1)
  bwd_prefix = jnp.concatenate([col(R_BOS, N), attrs_j, col(R_IS, N)], 1)
  key = jax.random.key(0)
  g = sampling.generate(ar, ar_params, fwd_prefix, key, max_new_tokens=2)
  res["ar_forward_gen"] = float(np.mean(np.all(np.asarray(g) == attrs, axis=1)))
  g = sampling.generate(ar, ar_params, bwd_prefix, key, max_new_tokens=2)
  g = np.asarray(g)
  res["ar_backward_gen"] = float(np.mean(np.all(g == names, axis=1)))
  res["ar_backward_gen_outputs_are_names"] = float(np.mean(np.all(
      (g >= R_SPECIAL) & (g < R_SPECIAL + (names.max() - R_SPECIAL + 1)), axis=1)))
  g = diffusion.generate(mdl, md_params, fwd_prefix, key, mask_id=R_MASK, steps=3,
                         gen_length=3, block_length=3)
  res["md_forward_gen_sampler"] = float(np.mean(np.all(np.asarray(g)[:, :2] == attrs, axis=1)))
  full = template(names_j, attrs_j)
  infill = jax.jit(md_infill_greedy, static_argnums=(0, 3, 4))
  g = infill(mdl, md_params, full, ATTR_POS, R_MASK)
  res["md_forward_gen_inplace"] = float(np.mean(np.all(np.asarray(g) == attrs, axis=1)))
  g = infill(mdl, md_params, full, NAME_POS, R_MASK)
  res["md_backward_gen_inplace"] = float(np.mean(np.all(np.asarray(g) == names, axis=1)))
  return res


def reversal(args):
  t_all = time.time()
  names, attrs, train = build_facts(args.facts, args.alphabet, args.seed)
  V, T = R_SPECIAL + 2 * args.alphabet, train.shape[1]
  out = {"_meta": {"facts": args.facts, "alphabet": args.alphabet, "steps": args.steps,
                   "batch": args.batch, "lr": args.lr, "d_model": args.d_model,
                   "layers": args.layers, "seeds": args.seeds, "seq_len": T, "vocab": V,
                   "md_eps": args.md_eps}}
  runs = []
  for seed in range(args.seed, args.seed + args.seeds):
    names, attrs, train = build_facts(args.facts, args.alphabet, seed)
    assert_forward_only(train, args.alphabet)
    ar = llama.Llama(make_config(V, args.d_model, args.layers, T, causal=True))
    mdl = llada.make_model(make_config(V, args.d_model, args.layers, T, causal=False))
    # pad_id = R_MASK: never in the data, so every AR target is scored
    tr_ar = Trainer(ar, lm_loss_fn(ar, pad_id=R_MASK), args.steps, args.lr, seed, T)
    tr_md = Trainer(mdl, md.masked_diffusion_loss_fn(mdl, R_MASK, eps=args.md_eps,
                                                     random_length_prob=0.0, drop_last=False),
                    args.steps, args.lr, seed, T)
    tr_ar.run(fact_batches(train, args.batch, 100 + seed), args.steps, f"reversal/AR s{seed}")
    tr_md.run(fact_batches(train, args.batch, 100 + seed), args.steps, f"reversal/MD s{seed}")
    t0 = time.time()
    res = reversal_eval(ar, tr_ar.params, mdl, tr_md.params, names, attrs)
    res.update(seed=seed, eval_seconds=round(time.time() - t0, 1),
               train_seconds_ar=round(tr_ar.seconds, 1), train_seconds_md=round(tr_md.seconds, 1),
               params=tr_ar.params_count, ar_losses=tr_ar.losses, md_losses=tr_md.losses)
    runs.append(res)
    print({k: v for k, v in res.items() if not k.endswith("losses")}, flush=True)
    out["runs"] = runs
    _save(args, "reversal.partial", out)
  keys = [k for k in runs[0] if k.endswith(("_rank", "_gen", "_sampler", "_inplace"))]
  out["summary"] = {k: {"mean": float(np.mean([r[k] for r in runs])),
                        "std": float(np.std([r[k] for r in runs]))} for k in keys}
  out["_meta"]["minutes"] = round((time.time() - t_all) / 60, 2)
  _save(args, "reversal", out)

  s = out["summary"]
  plt = _plt()
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  labels = ["AR", "masked diffusion"]
  x = np.arange(2)
  for j, (d, key) in enumerate([("forward", "forward_rank"), ("backward", "backward_rank")]):
    vals = [s["ar_" + key]["mean"], s["md_" + key]["mean"]]
    errs = [s["ar_" + key]["std"], s["md_" + key]["std"]]
    ax[0].bar(x + (j - 0.5) * 0.38, vals, 0.38, yerr=errs, label=d)
  ax[0].axhline(1 / args.facts, color="k", ls=":", label=f"chance (1/{args.facts})")
  ax[0].set(xticks=x, xticklabels=labels, ylabel="accuracy (rank among all N candidates)",
            title=f"Reversal: {args.facts} facts, trained forward only", ylim=(0, 1.05))
  ax[0].legend()
  r0 = runs[0]
  _plot_losses(fig, ax, args, "llada_reversal.png", r0["ar_losses"], r0["md_losses"],
               dict(ylabel="train loss (20-step avg)", title="Training (seed 0)", yscale="log"))
  print("| model | query | ranking acc (mean ± std) | greedy generation |\n|---|---|---|---|")
  rows = [("AR", "forward: BOS n IS -> a", "ar_forward_rank", "ar_forward_gen"),
          ("AR", "backward: BOS a IS -> n", "ar_backward_rank", "ar_backward_gen"),
          ("AR", "joint p(BOS n' IS a EOS), argmax n'", "ar_joint_rank", None),
          ("MD", "forward: BOS n IS _ _ EOS", "md_forward_rank", "md_forward_gen_inplace"),
          ("MD", "backward: BOS _ _ IS a EOS", "md_backward_rank", "md_backward_gen_inplace")]
  for m, q, rk, gk in rows:
    g = f"{s[gk]['mean']:.3f} ± {s[gk]['std']:.3f}" if gk else "-"
    print(f"| {m} | {q} | {s[rk]['mean']:.3f} ± {s[rk]['std']:.3f} | {g} |")
  print(f"MD forward via diffusion.generate: {s['md_forward_gen_sampler']['mean']:.3f}; "
        f"total {out['_meta']['minutes']} min")


def assert_forward_only(train, alphabet):
  """Every training sentence is BOS name IS attribute EOS: name tokens only at positions 1-2,
  attribute tokens only at 4-5 (no backward sentence leaks into training)."""
  is_name = lambda x: (x >= R_SPECIAL) & (x < R_SPECIAL + alphabet)
  is_attr = lambda x: (x >= R_SPECIAL + alphabet) & (x < R_SPECIAL + 2 * alphabet)
  ok = (np.all(train[:, 0] == R_BOS) and np.all(train[:, 3] == R_IS)
        and np.all(train[:, 6] == R_EOS) and np.all(is_name(train[:, 1:3]))
        and np.all(is_attr(train[:, 4:6])))
  if not ok:
    raise AssertionError("a training sentence is not of the form BOS name IS attribute EOS")


# ===================================================================================== sampler
S_BOS, S_SEP, S_MASK = 10, 11, 12
S_VOCAB = 13


def sort_problems(rng, n, digits, task="sort"):
  """(tokens [n, digits + 2 + digits], prompt_len): BOS d_1..d_D SEP answer, where the answer is
  sorted(d) (`sort`: one correct answer) or a fresh random permutation of d (`shuffle`: any
  permutation is correct, so the answer tokens depend on each other given the prompt)."""
  d = rng.integers(0, 10, (n, digits), dtype=np.int32)
  ans = np.sort(d, axis=1) if task == "sort" else rng.permuted(d, axis=1)
  col = lambda v: np.full((n, 1), v, np.int32)
  return np.concatenate([col(S_BOS), d, col(S_SEP), ans], 1), digits + 2


def score_answers(g, prompt_digits, answer, task):
  """(correct [n] bool, per-digit score [n]): `sort` exact / position-wise; `shuffle` the output is
  a permutation of the prompt / multiset overlap."""
  if task == "sort":
    return np.all(g == answer, axis=1), np.mean(g == answer, axis=1)
  cg = np.stack([np.sum(g == k, 1) for k in range(10)], 1)
  cp = np.stack([np.sum(prompt_digits == k, 1) for k in range(10)], 1)
  return np.all(cg == cp, axis=1), np.minimum(cg, cp).sum(1) / g.shape[1]


def sampler(args):
  t_all = time.time()
  D, task = args.digits, args.task
  T = 2 * D + 2
  cfg = make_config(S_VOCAB, args.d_model, args.layers, T, causal=False)
  mdl = llada.make_model(cfg)
  rng = np.random.default_rng(args.seed)

  def batches():
    while True:
      tokens, P = sort_problems(rng, args.batch, D, task)
      yield {"tokens": tokens, "prompt_len": np.full(args.batch, P, np.int32)}

  tr = Trainer(mdl, md.sft_loss_fn(mdl, S_MASK), args.steps, args.lr, args.seed, T)
  tr.run(batches(), args.steps, f"sampler/{task}/train")
  test, P = sort_problems(np.random.default_rng(10_000 + args.seed), args.eval_n, D, task)
  prompt, answer = jnp.asarray(test[:, :P]), test[:, P:]
  out = {"_meta": {"task": task, "digits": D, "steps": args.steps, "batch": args.batch,
                   "lr": args.lr, "d_model": args.d_model, "layers": args.layers,
                   "eval_n": args.eval_n, "params": tr.params_count,
                   "train_seconds": round(tr.seconds, 1)},
         "train_losses": tr.losses, "results": []}
  blocks = [b for b in (1, 2, 4, 8, 16, 32) if D % b == 0 and b <= D]
  step_opts = sorted({s for s in (1, 2, 4, 8, 16, 32) if s <= D} | {D})
  grid = [(s, b, r) for r in diffusion.REMASKING for b in blocks for s in step_opts
          if s >= D // b and s % (D // b) == 0]
  t0 = time.time()
  for s, b, r in tqdm(grid, desc=f"sampler/{task}/eval", dynamic_ncols=True):
    g = np.asarray(diffusion.generate(mdl, tr.params, prompt, jax.random.key(1), mask_id=S_MASK,
                                      steps=s, gen_length=D, block_length=b, remasking=r))
    ok, per = score_answers(g, test[:, 1:1 + D], answer, task)
    out["results"].append({"steps": s, "block_length": b, "remasking": r,
                           "exact_match": float(np.mean(ok)), "digit_accuracy": float(np.mean(per)),
                           "sorted_output": float(np.mean(np.all(np.diff(g, axis=1) >= 0, 1)))})
  # temperature 0 is deterministic across keys; temperature 1 is not
  det = {}
  for temp in (0.0, 1.0):
    a, c = (np.asarray(diffusion.generate(mdl, tr.params, prompt[:128], jax.random.key(k),
                                          mask_id=S_MASK, steps=D, gen_length=D, block_length=D,
                                          temperature=temp)) for k in (1, 2))
    det[str(temp)] = float(np.mean(np.all(a == c, axis=1)))
  out["identical_across_keys_at_temperature"] = det
  out["_meta"]["eval_seconds"] = round(time.time() - t0, 1)
  out["_meta"]["minutes"] = round((time.time() - t_all) / 60, 2)
  suffix = "" if task == "sort" else f"_{task}"
  _save(args, f"sampler{suffix}", out)

  what = ("exact match" if task == "sort" else "valid (a permutation of the prompt)")
  per_what = "per-digit accuracy" if task == "sort" else "multiset overlap"
  plt = _plt()
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for r, ls in zip(diffusion.REMASKING, ("-", "--")):
    for b in blocks:
      rows = [x for x in out["results"] if x["remasking"] == r and x["block_length"] == b]
      ax[0].plot([x["steps"] for x in rows], [x["exact_match"] for x in rows], ls, marker="o",
                 label=f"{r}, block {b}")
      ax[1].plot([x["steps"] for x in rows], [x["digit_accuracy"] for x in rows], ls,
                 marker="o", label=f"{r}, block {b}")
  ax[0].set(xscale="log", xlabel=f"steps (gen_length {D})", ylabel=what,
            title=f"{task} {D} digits: {what}")
  ax[1].set(xscale="log", xlabel=f"steps (gen_length {D})", ylabel=per_what, title=per_what)
  for a in ax:
    a.grid(alpha=0.3)
    a.set_xticks(step_opts, [str(s) for s in step_opts])
  ax[1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  Path(args.img).mkdir(parents=True, exist_ok=True)
  fig.savefig(Path(args.img, f"llada_sampler{suffix}.png"), dpi=110)
  print(f"| remasking | block length | steps | {what} | {per_what} | output sorted |\n"
        "|---|---|---|---|---|---|")
  for x in out["results"]:
    print(f"| {x['remasking']} | {x['block_length']} | {x['steps']} | {x['exact_match']:.3f} | "
          f"{x['digit_accuracy']:.3f} | {x['sorted_output']:.3f} |")
  print(f"identical across keys: {det}; train {tr.seconds:.0f} s, total "
        f"{out['_meta']['minutes']} min")


# ================================================================================== likelihood
def likelihood(args):
  t_all = time.time()
  tok, data = load_tokenizer("byte"), DataConfig(source="stdlib", tokenizer="byte")
  L = args.seq_len
  evals = list(eval_batches(data, tok, L, args.batch, max_batches=args.eval_batches))
  ar = llama.Llama(make_config(tok.vocab_size, args.d_model, args.layers, L, causal=True))
  mdl = llada.make_model(make_config(tok.vocab_size, args.d_model, args.layers, L, causal=False))
  ar_eval = jax.jit(lm_eval.make_eval_fn(ar, tok.pad_id, tok.token_bytes()))
  md_evals = {m: jax.jit(lm_eval.make_masked_diffusion_eval_fn(
      mdl, tok.mask_id, tok.pad_id, tok.token_bytes(), mc_num=m, seed=args.seed))
      for m in sorted({args.mc_num, args.mc_final})}

  def evaluate(fn, params):
    tot = np.zeros(3)
    for b in evals:
      tot += np.array([float(x) for x in fn(params, b)])
    return lm_eval.summarize(*tot)

  n_md = args.steps * args.md_multiple
  # each model's own cosine schedule over its own total steps; the MD's equal-steps point is an
  # intermediate checkpoint of a longer schedule, so a second MD run with the AR's schedule
  # gives the clean equal-compute number.
  tr_ar = Trainer(ar, lm_loss_fn(ar, tok.pad_id), args.steps, args.lr, args.seed, L)
  tr_md = Trainer(mdl, md.masked_diffusion_loss_fn(mdl, tok.mask_id), args.steps, args.lr,
                  args.seed, L)
  checkpoints = sorted({args.steps // 4, args.steps // 2, args.steps})
  out = {"_meta": {"steps": args.steps, "md_multiple": args.md_multiple, "batch": args.batch,
                   "seq_len": L, "lr": args.lr, "d_model": args.d_model, "layers": args.layers,
                   "eval_batches": args.eval_batches, "mc_num": args.mc_num,
                   "mc_final": args.mc_final, "params": tr_ar.params_count},
         "ar": [], "md": [], "md_long": []}
  for name, tr, fn in [("ar", tr_ar, ar_eval), ("md", tr_md, md_evals[args.mc_num])]:
    it = train_iterator(data, tok, L, args.batch)  # the same data order for both
    done = 0
    for c in checkpoints:
      tr.run(it, c - done, f"likelihood/{name}")
      done = c
      e = evaluate(fn, tr.params)
      out[name].append({"step": c, "tokens": c * args.batch * L, "bpb": e["bpb"],
                        "loss": e["loss"], "train_seconds": round(tr.seconds, 1)})
      print(f"{name} step {c}: held-out bpb {e['bpb']:.4f}", flush=True)
    out[f"{name}_train_losses"] = tr.losses
    _save(args, "likelihood.partial", out)
  # final MD number at a larger Monte Carlo size, and its MC spread over 3 mask seeds
  finals = []
  for s in range(3):
    fn = jax.jit(lm_eval.make_masked_diffusion_eval_fn(mdl, tok.mask_id, tok.pad_id,
                                                       tok.token_bytes(), mc_num=args.mc_final,
                                                       seed=1000 + s))
    finals.append(evaluate(fn, tr_md.params)["bpb"])
  out["md_final_bpb_mc"] = {"mc_num": args.mc_final, "values": finals,
                            "mean": float(np.mean(finals)), "std": float(np.std(finals))}
  out["unigram_bpb"] = lm_eval.unigram_bpb(
      lm_eval.unigram_log_probs(_token_counts(data, tok)), evals, tok.pad_id, tok.token_bytes())
  # longer MD run (its own schedule over md_multiple x steps), evaluated along the way
  if args.md_multiple > 1:
    tr_long = Trainer(mdl, md.masked_diffusion_loss_fn(mdl, tok.mask_id), n_md, args.lr,
                      args.seed, L)
    it, done = train_iterator(data, tok, L, args.batch), 0
    for c in sorted({args.steps, n_md // 2, n_md}):
      tr_long.run(it, c - done, "likelihood/md_long")
      done = c
      e = evaluate(md_evals[args.mc_num], tr_long.params)
      out["md_long"].append({"step": c, "tokens": c * args.batch * L, "bpb": e["bpb"],
                             "loss": e["loss"], "train_seconds": round(tr_long.seconds, 1)})
      print(f"md_long step {c}: held-out bpb bound {e['bpb']:.4f}", flush=True)
    out["md_long_final_bpb_mc"] = float(np.mean(
        [evaluate(jax.jit(lm_eval.make_masked_diffusion_eval_fn(
            mdl, tok.mask_id, tok.pad_id, tok.token_bytes(), mc_num=args.mc_final,
            seed=1000 + s)), tr_long.params)["bpb"] for s in range(2)]))
    out["md_long_train_losses"] = tr_long.losses
  out["_meta"]["minutes"] = round((time.time() - t_all) / 60, 2)
  _save(args, "likelihood", out)

  plt = _plt()
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for key, lab in [("ar", "AR (exact)"), ("md", "MD bound (same schedule as AR)"),
                   ("md_long", f"MD bound ({args.md_multiple}x schedule)")]:
    if out[key]:
      ax[0].plot([x["step"] for x in out[key]], [x["bpb"] for x in out[key]], marker="o",
                 label=lab)
  ax[0].axhline(out["unigram_bpb"], color="k", ls=":", label="unigram")
  ax[0].set(xlabel="training steps (16 x 128 tokens each)" if args.batch == 16 else "steps",
            ylabel="held-out bits per byte", title="Code corpus: AR vs masked diffusion")
  ax[0].legend()
  _plot_losses(fig, ax, args, "llada_likelihood.png", out["ar_train_losses"],
               out["md_train_losses"],
               dict(ylabel="train loss (nats/token, 20-step avg)", title="Training"))
  a, m = out["ar"][-1]["bpb"], out["md_final_bpb_mc"]
  print(f"AR {a:.4f} bpb vs MD bound {m['mean']:.4f} ± {m['std']:.4f} (mc {args.mc_final}) at "
        f"{args.steps} steps; gap {m['mean'] - a:+.4f} ({m['mean'] / a - 1:+.1%}); unigram "
        f"{out['unigram_bpb']:.4f}; md_long {out['md_long'][-1]['bpb'] if out['md_long'] else '-'}"
        f"; total {out['_meta']['minutes']} min")


def _token_counts(data, tok):
  from jaxllm.data.pipeline import token_counts
  return token_counts(data, tok, split="train")


# ======================================================================================== main
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("exp", choices=["reversal", "sampler", "likelihood"])
  p.add_argument("--out", default="runs/llada")
  p.add_argument("--img", default="docs/results/img")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--lr", type=float, default=None)
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--layers", type=int, default=None)
  # reversal
  p.add_argument("--facts", type=int, default=150)
  p.add_argument("--alphabet", type=int, default=24)
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--md-eps", type=float, default=0.1,
                 help="p_mask floor of the MD loss (authors 1e-3; see docs/results/llada_reversal.md)")
  # sampler
  p.add_argument("--digits", type=int, default=8)
  p.add_argument("--task", choices=["sort", "shuffle"], default="sort")
  p.add_argument("--eval-n", type=int, default=512)
  # likelihood
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--mc-num", type=int, default=16)
  p.add_argument("--mc-final", type=int, default=64)
  p.add_argument("--md-multiple", type=int, default=3)
  args = p.parse_args(argv)
  defaults = {"reversal": dict(steps=3000, batch=128, lr=3e-3, layers=3),
              "sampler": dict(steps=1200, batch=128, lr=2e-3, layers=4),
              "likelihood": dict(steps=400, batch=16, lr=3e-3, layers=4)}[args.exp]
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  {"reversal": reversal, "sampler": sampler, "likelihood": likelihood}[args.exp](args)


if __name__ == "__main__":
  main()
