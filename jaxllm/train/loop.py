"""The training loop: data -> sharded steps -> metrics, eval, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm import config as config_lib
from jaxllm.data import eval_batches, load_tokenizer, token_counts, train_iterator
from jaxllm.eval import lm as lm_eval
from jaxllm.infer.sampling import generate
from jaxllm.models.llama import Llama
from jaxllm.sharding import make_mesh
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.metrics import MetricsWriter, plot_loss_curve
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.step import ShardedTrainer, TrainState, lm_loss_fn


class NonFiniteLossError(FloatingPointError):
  pass


def initialize_distributed(cfg: config_lib.DistributedConfig) -> None:
  """`jax.distributed.initialize` for multi-host runs (arguments None = auto-detect on pods)."""
  if not cfg.enabled:
    return
  if cfg.local_device_count:  # CPU simulation of several hosts
    jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                             num_processes=cfg.num_processes, process_id=cfg.process_id)


@dataclasses.dataclass
class Run:
  """Everything a run needs, built from a Config (shared by train, eval and generate)."""

  config: config_lib.Config
  tokenizer: Any
  model: Llama  # or a `jaxllm.quant.QuantizedModel` wrapping one (same init/apply/config)
  trainer: ShardedTrainer
  workdir: Path

  @classmethod
  def build(cls, cfg: config_lib.Config) -> "Run":
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_cfg = cfg.model_config(tokenizer.vocab_size)
    if cfg.train.seq_len > model_cfg.max_seq_len:
      raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model max_seq_len="
                       f"{model_cfg.max_seq_len}; lower train.seq_len or set model.max_seq_len.")
    mesh = make_mesh(cfg.mesh)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % (data_parallel * cfg.train.grad_accum):
      raise ValueError(
          f"train.batch_size={cfg.train.batch_size} must be divisible by the data-parallel "
          f"devices (mesh data x fsdp = {data_parallel}) times train.grad_accum="
          f"{cfg.train.grad_accum}; use a batch size that is a multiple of "
          f"{data_parallel * cfg.train.grad_accum}.")
    if cfg.train.batch_size % jax.process_count():
      raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                       f"{jax.process_count()} processes.")
    model = Llama(model_cfg)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    policy = cfg.quant.policy()
    if policy is not None:  # QAT: the same model under a quantization policy
      from jaxllm.quant.recipe import qat_optimizer
      model = policy.apply(model)
      optimizer = qat_optimizer(cfg.optim, cfg.quant, policy, cfg.train.steps)
    example = {"tokens": jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1),
                                              jnp.int32)}
    trainer = ShardedTrainer(model, optimizer, mesh,
                             _loss_fn(cfg.train.objective, model, tokenizer), example,
                             cfg.train.grad_accum)
    return cls(cfg, tokenizer, model, trainer, Path(cfg.train.workdir))

  @property
  def local_batch_size(self) -> int:
    return self.config.train.batch_size // jax.process_count()

  def eval_batch_iter(self, max_batches: int):
    """Exactly `max_batches` local batches per process (all-pad filler once data runs out, so
    every process joins every collective)."""
    cfg, tok = self.config, self.tokenizer
    it = iter(eval_batches(cfg.data, tok, cfg.train.seq_len, self.local_batch_size,
                           split="validation", max_batches=max_batches,
                           process_index=jax.process_index(),
                           process_count=jax.process_count()))
    filler = {"tokens": np.full((self.local_batch_size, cfg.train.seq_len + 1), tok.pad_id,
                                np.int32)}
    for _ in range(max_batches):
      yield next(it, filler)

  def evaluate(self, params, max_batches: int, with_baseline: bool = False) -> dict[str, float]:
    tok = self.tokenizer
    token_bytes = tok.token_bytes()
    eval_fn = self._eval_fn()
    totals = np.zeros(3)
    local = []
    for batch in self.eval_batch_iter(max_batches):
      local.append(batch)
      totals += np.array([float(x) for x in self.trainer.evaluate(
          eval_fn, params, self.trainer.shard_batch(batch))])
    out = lm_eval.summarize(*totals)
    if with_baseline:
      log_probs = lm_eval.unigram_log_probs(token_counts(self.config.data, tok, split="train"))
      out["unigram_bpb"] = lm_eval.unigram_bpb(log_probs, local, tok.pad_id, token_bytes)
    return out

  def _eval_fn(self):
    if not hasattr(self, "_cached_eval_fn"):
      tok = self.tokenizer
      if self.config.train.objective == "masked_diffusion":
        self._cached_eval_fn = lm_eval.make_masked_diffusion_eval_fn(
            self.model, tok.mask_id, tok.pad_id, tok.token_bytes())
      else:
        self._cached_eval_fn = lm_eval.make_eval_fn(self.model, tok.pad_id, tok.token_bytes())
    return self._cached_eval_fn

  def sample(self, params, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
             top_k: int = 0, seed: int = 0, steps: int = 0, block_length: int = 0,
             remasking: str = "low_confidence", cfg_scale: float = 0.0) -> str:
    """Text continuing `prompt`. Autoregressive models decode with a KV cache (temperature,
    top-k, top-p); masked-diffusion models unmask `max_new_tokens` positions in `steps` steps
    over semi-autoregressive blocks of `block_length` (0: one block, one token per step)."""
    tok = self.tokenizer
    prompt_ids = np.concatenate([[tok.bos_id], tok.encode(prompt)]).astype(np.int32)[None]
    max_new_tokens = min(max_new_tokens, self.model.config.max_seq_len - prompt_ids.shape[1])
    params = jax.device_get(params)
    if self.config.train.objective == "masked_diffusion":
      from jaxllm.infer import diffusion
      out = diffusion.generate(
          self.model, params, jnp.asarray(prompt_ids), jax.random.key(seed),
          mask_id=tok.mask_id, steps=steps or max_new_tokens, gen_length=max_new_tokens,
          block_length=block_length or max_new_tokens, temperature=temperature,
          cfg_scale=cfg_scale, remasking=remasking, eos_id=tok.eos_id, pad_id=tok.pad_id)
    else:
      out = generate(self.model, params, jnp.asarray(prompt_ids), jax.random.key(seed),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return prompt + tok.decode(np.asarray(out[0]))

  def restore(self, ckpt: Checkpointer, data_iterator=None) -> TrainState:
    state, _ = ckpt.restore(self.trainer.abstract_state, data_iterator)
    return state


def _loss_fn(objective: str, model: Llama, tokenizer):
  if objective == "next_token":
    return lm_loss_fn(model, tokenizer.pad_id)
  from jaxllm.objectives.masked_diffusion import masked_diffusion_loss_fn
  if tokenizer.mask_id is None:
    raise ValueError(f"train.objective='masked_diffusion' needs a tokenizer with a mask token; "
                     f"{tokenizer.spec!r} has none (the byte tokenizer has one).")
  return masked_diffusion_loss_fn(model, tokenizer.mask_id)


def _check_finite(step: int, metrics: dict[str, Any], last_ckpt: int | None) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    where = (f"the last checkpoint is step {last_ckpt}; nothing after it was saved" if last_ckpt
             else "no checkpoint was saved")
    raise NonFiniteLossError(
        f"Loss became {loss} at step {step}; stopping ({where}). "
        "Try a lower optim.lr, a longer optim.warmup_steps, or optim.clip_norm.")


def train(cfg: config_lib.Config) -> dict[str, Any]:
  """Trains (or resumes) the run in `cfg.train.workdir`; returns the final metrics."""
  initialize_distributed(cfg.distributed)
  tcfg = cfg.train
  run = Run.build(cfg)
  workdir = run.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  data_it = train_iterator(cfg.data, run.tokenizer, tcfg.seq_len, run.local_batch_size,
                           jax.process_index(), jax.process_count())
  ckpt = Checkpointer(workdir / "checkpoints", tcfg.keep_ckpts)
  if ckpt.latest_step() is not None:
    state = run.restore(ckpt, data_it)
    if is_main:
      print(f"Resumed from {ckpt.directory} at step {int(state.step)}.")
  else:
    state = run.trainer.init(tcfg.seed)
  if is_main:
    (workdir / "config.json").write_text(json.dumps(
        {**cfg.to_dict(), "resolved_model": dataclasses.asdict(run.model.config)}, indent=2,
        default=str))
    n_params = run.model.config.num_params()
    print(f"Model: {n_params / 1e6:.2f}M parameters; mesh {dict(run.trainer.mesh.shape)}; "
          f"{jax.device_count()} devices in {jax.process_count()} process(es).")
  writer = MetricsWriter(workdir)
  start = int(state.step)
  end = min(tcfg.steps, tcfg.halt_at) if tcfg.halt_at else tcfg.steps
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  last_ckpt = ckpt.latest_step()
  bar = tqdm(total=end, initial=start, disable=not (tcfg.progress and is_main),
             desc="train", unit="step", dynamic_ncols=True)
  losses: list[float] = []
  schedule = make_schedule(cfg.optim, tcfg.steps)
  pending = None  # (step, metrics) of the previous step, read after the next is dispatched
  t0, t_window, steps_window = time.perf_counter(), time.perf_counter(), 0
  try:
    for step in range(start + 1, end + 1):
      batch = run.trainer.shard_batch(next(data_it))
      state, metrics = run.trainer.train_step(state, batch)
      if pending is not None:
        _check_finite(pending[0], pending[1], last_ckpt)
        losses.append(float(pending[1]["loss"]))
      pending = (step, metrics)
      steps_window += 1
      if step % tcfg.log_every == 0 or step == end:
        _check_finite(step, metrics, last_ckpt)
        now = time.perf_counter()
        tok_s = steps_window * tokens_per_step / (now - t_window)
        t_window, steps_window = now, 0
        values = {k: float(v) for k, v in metrics.items()}
        values["tokens_per_s"] = tok_s
        values["lr"] = float(schedule(step))
        writer.write(step, "train", values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
      bar.update(1)
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step != end:
        writer.write(step, "eval", run.evaluate(state.params, tcfg.eval_batches))
      if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step != end:
        ckpt.save(step, state, data_it, meta={"step": step})
        last_ckpt = step
    if pending is not None:
      _check_finite(pending[0], pending[1], last_ckpt)
      losses.append(float(pending[1]["loss"]))
    bar.close()
    if end > start:
      ckpt.save(end, state, data_it, meta={"step": end})
  finally:
    bar.close()
    ckpt.wait()
  summary: dict[str, Any] = {"step": end, "train_losses": losses,
                             "train_seconds": time.perf_counter() - t0}
  if end == tcfg.steps:  # finished (not halted): final eval, plot, sample
    final = run.evaluate(state.params, tcfg.eval_batches, with_baseline=is_main)
    writer.write(end, "eval", {k: v for k, v in final.items() if k != "unigram_bpb"})
    summary["eval"] = final
    if is_main:
      print(f"Held-out: loss {final['loss']:.4f} nats/token, {final['bpb']:.4f} bits/byte "
            f"(unigram baseline {final.get('unigram_bpb', float('nan')):.4f} bits/byte) over "
            f"{int(final['tokens']):,} tokens.")
      png = plot_loss_curve(workdir / "metrics.jsonl", workdir / "loss.png",
                            final.get("unigram_bpb"))
      print(f"Checkpoint: {ckpt.directory}/{end}   loss curve: {png}")
      if tcfg.sample_prompt:
        text = run.sample(state.params, tcfg.sample_prompt, tcfg.sample_tokens,
                          tcfg.sample_temperature, tcfg.sample_top_p, seed=tcfg.seed)
        summary["sample"] = text
        print("Sample:\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
  writer.close()
  ckpt.close()
  return summary
