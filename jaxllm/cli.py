"""The `jaxllm` command: train, eval, generate, and train a tokenizer.

    jaxllm train --config experiments/configs/main.toml --set train.steps=100
    jaxllm eval --workdir runs/main
    jaxllm generate --workdir runs/main --prompt "def fib(n):"
    jaxllm tokenizer --out tok.json --vocab-size 4096
    jaxllm import-hf path/to/hf_llama --workdir runs/imported
    jaxllm quantize --workdir runs/main --weight paretoq:2      # PTQ + packed export
    jaxllm sr train --stage vqvae --workdir runs/vq             # super-resolution, stage 1
    jaxllm sr train --stage sr --vqvae runs/vq --workdir runs/sr   # stage 2 (VARSR)
    jaxllm sr train --stage cnn --workdir runs/cnn              # regression-CNN baseline
    jaxllm sr train --stage cfw --sr-run runs/sr --workdir runs/cfw  # LR-fused decoder
    jaxllm sr upscale in.png out.png --scale 4 --ckpt runs/sr --compare side_by_side.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _load_run_config(workdir: str, overrides: list[str]):
  from jaxllm import config as config_lib
  from jaxllm.train.checkpoint import require_checkpoint
  require_checkpoint(workdir)
  values = json.loads((Path(workdir) / "config.json").read_text())
  values.pop("resolved_model", None)
  cfg = config_lib.from_dict(values)
  for text in overrides:  # e.g. a different data source for eval
    keys, value = config_lib.parse_override(text)
    merged = cfg.to_dict()
    node = merged
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
    cfg = config_lib.from_dict(merged)
  return cfg


def cmd_train(args) -> int:
  from jaxllm import config as config_lib
  from jaxllm.train.loop import train
  cfg = config_lib.load(args.config, args.set)
  summary = train(cfg)
  if "eval" in summary:
    print(json.dumps({k: round(v, 4) for k, v in summary["eval"].items()}))
  return 0


def cmd_eval(args) -> int:
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.loop import Run
  cfg = _load_run_config(args.workdir, args.set)
  run = Run.build(cfg)
  state = run.restore(Checkpointer(Path(args.workdir) / "checkpoints"))
  out = run.evaluate(state.params, args.batches or cfg.train.eval_batches, with_baseline=True)
  print(f"step {int(state.step)}: held-out loss {out['loss']:.4f} nats/token, "
        f"{out['bpb']:.4f} bits/byte (unigram baseline {out['unigram_bpb']:.4f})")
  print(json.dumps(out))
  return 0


def cmd_generate(args) -> int:
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.loop import Run
  cfg = _load_run_config(args.workdir, args.set)
  run = Run.build(cfg)
  if args.packed:  # packed low-bit weights from `jaxllm quantize`
    from jaxllm.quant import Policy
    from jaxllm.quant.export import load_packed
    params = load_packed(args.packed)
    run.model = Policy((), kernels=cfg.quant.kernels).apply(getattr(run.model, "model", run.model))
  else:
    params = run.restore(Checkpointer(Path(args.workdir) / "checkpoints")).params
  print(run.sample(params, args.prompt, args.max_new_tokens, args.temperature,
                   args.top_p, args.top_k, args.seed, steps=args.steps,
                   block_length=args.block_length, remasking=args.remasking,
                   cfg_scale=args.cfg_scale))
  return 0


def cmd_tokenizer(args) -> int:
  from jaxllm.data import DataConfig, train_bpe
  from jaxllm.data.pipeline import documents
  docs = documents(DataConfig(source=args.source), "train")
  if args.max_docs:
    docs = docs[:args.max_docs]
  tok = train_bpe((d.decode("utf-8", errors="replace") for d in docs), args.vocab_size, args.out)
  print(f"Trained a {tok.vocab_size}-token BPE tokenizer -> {args.out}")
  return 0


def cmd_import_hf(args) -> int:
  """A run directory from a local HF Llama checkpoint: `eval`, `generate` and `train`
  (fine-tuning) then work on it."""

  import jax

  from jaxllm import config as config_lib
  from jaxllm.hub import load_hf_llama
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.loop import Run
  model_cfg, params = load_hf_llama(args.hf_dir)
  model = {"preset": "custom", **dataclasses.asdict(model_cfg)}
  if model_cfg.rope_scaling is not None:
    model["rope_scaling"] = dataclasses.asdict(model_cfg.rope_scaling)
  tokenizer = args.tokenizer or args.hf_dir
  cfg = config_lib.load(args.config, [f"train.workdir={json.dumps(args.workdir)}",
                                      f"data.tokenizer={json.dumps(tokenizer)}", *args.set])
  cfg = dataclasses.replace(cfg, model=model)
  run = Run.build(cfg)
  workdir = Path(args.workdir)
  if (workdir / "checkpoints").exists():
    raise FileExistsError(f"{workdir}/checkpoints already exists; choose a new --workdir.")
  workdir.mkdir(parents=True, exist_ok=True)
  state = run.trainer.init(cfg.train.seed)
  params = jax.tree.map(lambda x, like: jax.device_put(x.astype(like.dtype), like.sharding),
                        params, state.params)
  state = state.replace(params=params, opt_state=run.trainer.optimizer.init(params))
  (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
  ckpt = Checkpointer(workdir / "checkpoints")
  ckpt.save(0, state, meta={"step": 0, "imported_from": str(args.hf_dir)})
  ckpt.wait()
  ckpt.close()
  print(f"Imported {args.hf_dir} ({model_cfg.num_params() / 1e6:.1f}M parameters) -> {workdir}")
  return 0


def _ptq_policy(args, run):
  """The PTQ policy from the flags, or the QAT run's own policy."""
  from jaxllm.quant import policy as pol
  from jaxllm.quant import ptq
  from jaxllm.quant.recipe import parse_spec
  layers = r"layers_\d+/.*"
  chosen = [name for name in ("weight", "rule", "mixed") if getattr(args, name)]
  if len(chosen) > 1:
    raise ValueError(f"Give one of --weight, --rule or --mixed (got {', '.join(chosen)}).")
  if args.weight:
    return pol.Policy((pol.Rule(layers, parse_spec(args.weight, "--weight")),))
  if args.rule:
    rules = []
    for i, text in enumerate(args.rule):
      pattern, eq, spec = text.rpartition("=")
      if not eq or not pattern:
        raise ValueError(f"--rule {text!r} must look like 'REGEX=SPEC', e.g. "
                         "'layers_\\d+/mlp/.*=paretoq:1.58'.")
      rules.append(pol.Rule(pattern, parse_spec(spec, f"--rule {i}")))
    return pol.Policy(tuple(rules))
  if args.mixed:
    high, sep, low = args.mixed.partition(",")
    if not sep:
      raise ValueError(f"--mixed {args.mixed!r} must be 'HIGH,LOW', e.g. 'minmax:4,paretoq:1.58'.")
    return ptq.mixed_precision_policy(
        run.model.config.n_layers, high=parse_spec(high, "--mixed HIGH"),
        low=parse_spec(low, "--mixed LOW"), high_first_layers=args.high_first_layers)
  policy = run.config.quant.policy()
  if policy is None:
    raise ValueError("This run was trained without a [quant] policy: say how to quantize it "
                     "with --weight SPEC (e.g. --weight minmax:4), --rule REGEX=SPEC or --mixed "
                     "HIGH,LOW.")
  return pol.Policy(policy.rules, policy.exclude)  # the trained scales are used, gates dropped


def cmd_quantize(args) -> int:
  """Post-training quantization (or export of a QAT run): packed weights, size and quality."""
  import jax
  import numpy as np

  from jaxllm.eval import lm as lm_eval
  from jaxllm.quant import ptq
  from jaxllm.quant.export import save_packed
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.loop import Run
  cfg = _load_run_config(args.workdir, args.set)
  run = Run.build(cfg)
  state = run.restore(Checkpointer(Path(args.workdir) / "checkpoints"))
  policy = dataclasses.replace(_ptq_policy(args, run), kernels=cfg.quant.kernels)
  params = jax.device_get(state.params)
  packed, report = ptq.quantize_params(params, policy)
  out = Path(args.out or Path(args.workdir) / "packed")
  path = save_packed(packed, out / "packed.safetensors")
  (out / "size_report.md").write_text(report.table() + "\n")
  float_bytes = ptq.size_report(params).total_bytes
  print(f"Packed {path}: {report.total_bytes:,} bytes ({float_bytes:,} in float; "
        f"{report.quantized_bits_per_weight:.3f} bits/weight over the quantized tensors, "
        f"{report.bits_per_weight:.3f} over the whole model); per-tensor table in "
        f"{out / 'size_report.md'}.")
  result = {"bytes": report.total_bytes, "float_bytes": float_bytes,
            "quantized_bits_per_weight": report.quantized_bits_per_weight}
  if args.eval_batches:
    tok = run.tokenizer
    base = getattr(run.model, "model", run.model)
    for name, model, p in (("float", run.model, params), ("packed", policy.apply(base), packed)):
      fn = jax.jit(lm_eval.make_eval_fn(model, tok.pad_id, tok.token_bytes()))
      totals = np.zeros(3)
      for batch in run.eval_batch_iter(args.eval_batches):
        totals += np.array([float(x) for x in fn(p, batch)])
      result[f"{name}_bpb"] = lm_eval.summarize(*totals)["bpb"]
    label = "QAT model" if base is not run.model else "float model"
    print(f"Held-out bits/byte: {label} {result['float_bpb']:.4f}, packed "
          f"{result['packed_bpb']:.4f} ({args.eval_batches} batches).")
  (out / "quantize.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result))
  return 0


# ------------------------------------------------------------------------ super-resolution (sr)


def cmd_sr_train(args) -> int:
  from jaxllm.train import sr
  cfg = sr.SRTrainConfig(
      stage=args.stage, workdir=args.workdir, vqvae_preset=args.vqvae_preset,
      varsr_preset=args.varsr_preset, cnn_preset=args.cnn_preset, vqvae_dir=args.vqvae,
      vqvae_overrides=args.vqvae_set, varsr_overrides=args.varsr_set,
      cnn_overrides=args.cnn_set, cfw_overrides=args.cfw_set, sr_dir=args.sr_run,
      decoder_dir=args.decoder, cfw_init=args.cfw_init, crop_size=args.crop_size, data=args.data,
      scale=args.scale, degradation=args.degradation, negative_prob=args.negative_prob,
      steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
      seed=args.seed, log_every=args.log_every, save_every=args.save_every,
      progress=not args.no_progress)
  out = sr.train(cfg)
  print(json.dumps({k: round(v, 4) for k, v in out["metrics"].items()}))
  return 0


def cmd_sr_upscale(args) -> int:
  from jaxllm.data import images
  from jaxllm.train import sr
  model = sr.load_sr(args.ckpt, decoder=args.decoder)
  if not Path(args.input).is_file():
    raise FileNotFoundError(f"input image {args.input} does not exist.")
  from PIL import Image
  with Image.open(args.input) as im:  # documented conversions (jaxllm.data.images.to_rgb)
    mode = im.mode
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
      im = im.convert("RGB")
    lr = images.to_rgb(im)
  if mode not in ("RGB", "P"):
    how = ("alpha channel dropped" if "A" in mode else "converted by Pillow" if mode in (
        "CMYK", "YCbCr", "LAB", "HSV") else "channel replicated to RGB")
    print(f"jaxllm sr upscale: note: {args.input} is {mode}, not RGB: {how}.", file=sys.stderr)
  out = sr.upscale_image(model, lr, args.scale, seed=args.seed, cfg=args.cfg, top_k=args.top_k,
                         top_p=args.top_p, temperature=args.temperature,
                         refine=not args.no_refine, refiner_steps=args.refiner_steps,
                         self_ensemble=args.self_ensemble, color_fix=args.color_fix,
                         mbr_tokens=args.mbr_tokens, cfw_weight=args.cfw_weight)
  images.save_image(args.output, out)
  out = images.to_uint8(out).astype("float32") / 255.0  # metrics describe the file as written
  result = {"output": str(args.output), "size": list(out.shape[:2])}
  hr = None
  if args.hr:
    from jaxllm.eval.sr_metrics import sr_metrics
    hr = images.load_image(args.hr)[:out.shape[0], :out.shape[1]]
    if hr.shape != out.shape:
      raise ValueError(f"--hr {args.hr} is {hr.shape[0]}x{hr.shape[1]}, smaller than the "
                       f"{out.shape[0]}x{out.shape[1]} output; pass the HR of this LR image.")
    result["ours"] = sr_metrics(out, hr, args.scale)
    result["bicubic"] = sr_metrics(sr.bicubic_upscale(lr, args.scale), hr, args.scale)
  if args.compare:
    label = "CNN" if isinstance(model, sr.CNNModel) else "VARSR"
    images.save_image(args.compare, sr.comparison_image(lr, {label: out}, args.scale, hr)
                      .astype("float32") / 255.0)
    result["compare"] = str(args.compare)
  print(json.dumps(result))
  return 0


def _add_sr_parser(sub) -> None:
  s = sub.add_parser("sr", help="image super-resolution: train the VQ-VAE / VARSR / CNN, upscale")
  sr_sub = s.add_subparsers(dest="sr_command", required=True)
  t = sr_sub.add_parser("train", help="train (or resume) one stage: --stage vqvae, then sr; "
                        "the cnn baseline; --stage decoder (tune a VQ-VAE's decoder only); "
                        "--stage cfw (StableSR's LR-fused decoder for a trained sr run)")
  t.add_argument("--stage", required=True, choices=["vqvae", "decoder", "sr", "cnn", "cfw"])
  t.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  t.add_argument("--vqvae", default=None, metavar="DIR",
                 help="sr and decoder stages: the VQ-VAE run")
  t.add_argument("--sr-run", default=None, metavar="DIR",
                 help="cfw stage: the sr-stage run whose outputs it learns to correct")
  t.add_argument("--decoder", default=None, metavar="DIR",
                 help="cfw stage: a --stage decoder run of the sr run's VQ-VAE to decode with")
  t.add_argument("--vqvae-preset", default="small", help="tiny | small | var_f16 | varsr_f16")
  t.add_argument("--varsr-preset", default="small", help="VARSR size: tiny | small | medium")
  t.add_argument("--cnn-preset", default="small", help="cnn stage: tiny | small")
  t.add_argument("--vqvae-set", nargs="*", default=[], metavar="FIELD=JSON")
  t.add_argument("--varsr-set", nargs="*", default=[], metavar="FIELD=JSON",
                 help="e.g. positions=learned conditioning=additive (the ablations)")
  t.add_argument("--cnn-set", nargs="*", default=[], metavar="FIELD=JSON")
  t.add_argument("--cfw-set", nargs="*", default=[], metavar="FIELD=JSON",
                 help="cfw stage, e.g. levels=[1,2] blocks=2 adv_weight=0.1 (adversarial term)")
  t.add_argument("--cfw-init", default=None, metavar="DIR",
                 help="cfw stage: a cfw run of the same sr run to start the fusion from")
  t.add_argument("--crop-size", type=int, default=64,
                 help="cnn stage: HR crop side (the sr stage uses the VQ-VAE's image size)")
  t.add_argument("--data", default="skimage",
                 help='"skimage" (embedded photos, held-out ones excluded) or a folder')
  t.add_argument("--scale", type=int, default=4)
  t.add_argument("--degradation", default="varsr_x4", help="varsr_x4 | realesrgan_x4")
  t.add_argument("--negative-prob", type=float, default=0.1,
                 help="share of negative-quality targets (needed for --cfg at upscale time)")
  t.add_argument("--steps", type=int, default=1000)
  t.add_argument("--batch-size", type=int, default=8)
  t.add_argument("--lr", type=float, default=1e-3)
  t.add_argument("--warmup-steps", type=int, default=50)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--log-every", type=int, default=50)
  t.add_argument("--save-every", type=int, default=0)
  t.add_argument("--no-progress", action="store_true")
  t.set_defaults(fn=cmd_sr_train)
  u = sr_sub.add_parser("upscale", help="upscale an image with a trained sr-stage run")
  u.add_argument("input", help="LR image (RGB; grayscale / RGBA are converted, with a note)")
  u.add_argument("output", help="where to write the SR image (PNG recommended)")
  u.add_argument("--scale", type=int, required=True, help="must be the checkpoint's scale")
  u.add_argument("--ckpt", required=True, metavar="DIR",
                 help="a `jaxllm sr train --stage sr` (or --stage cnn, --stage cfw) run")
  u.add_argument("--compare", default=None, metavar="PNG",
                 help="also write LR | bicubic | ours | HR side by side")
  u.add_argument("--hr", default=None, help="ground-truth HR image: PSNR/SSIM, and a panel")
  u.add_argument("--cfg", type=float, default=None,
                 help="image-based CFG scale (VARSR: 6); default: positive label only")
  u.add_argument("--top-k", type=int, default=1)
  u.add_argument("--top-p", type=float, default=0.75)
  u.add_argument("--temperature", type=float, default=1.0,
                 help="scales the refiner's sampling noise (0: its mean path, higher PSNR) and, "
                 "with --top-k > 1, the token logits")
  u.add_argument("--decoder", default=None, metavar="DIR",
                 help="a `--stage decoder` run tuned from this checkpoint's VQ-VAE: decode with it")
  u.add_argument("--cfw-weight", type=float, default=None, metavar="W",
                 help="cfw-stage runs: StableSR's fidelity weight in [0, 1] (default 1; 0 is the "
                 "plain decoder)")
  u.add_argument("--no-refine", action="store_true", help="skip the diffusion refiner")
  u.add_argument("--mbr-tokens", action="store_true",
                 help="tokens nearest the expected code vector (minimum Bayes risk in code "
                 "space) instead of greedy / sampled ones: higher PSNR without the refiner")
  u.add_argument("--self-ensemble", action="store_true",
                 help="average over the 8 flips / rotations of the input (8x the time)")
  u.add_argument("--refiner-steps", type=int, default=None)
  u.add_argument("--color-fix", default="adain", choices=["adain", "wavelet", "none"],
                 help="colour correction to the bicubic LR: per-tile channel statistics "
                 "(VARSR's), or the whole image's low-frequency bands (StableSR's wavelet fix)")
  u.add_argument("--seed", type=int, default=0)
  u.set_defaults(fn=cmd_sr_upscale)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxllm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train or resume a model")
  t.add_argument("--config", help="TOML file (see experiments/configs/)")
  t.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
  t.set_defaults(fn=cmd_train)
  for name, fn, helptext in (("eval", cmd_eval, "held-out loss and bits per byte"),
                             ("generate", cmd_generate, "sample text from a checkpoint")):
    c = sub.add_parser(name, help=helptext)
    c.add_argument("--workdir", required=True, help="a run directory made by `jaxllm train`")
    c.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    c.set_defaults(fn=fn)
  e = sub.choices["eval"]
  e.add_argument("--batches", type=int, default=0)
  g = sub.choices["generate"]
  g.add_argument("--prompt", default="")
  g.add_argument("--packed", default=None, metavar="FILE",
                 help="generate from packed weights (WORKDIR/packed/packed.safetensors)")
  g.add_argument("--max-new-tokens", type=int, default=200)
  g.add_argument("--temperature", type=float, default=0.8)
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--top-p", type=float, default=0.95)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--steps", type=int, default=0,
                 help="masked diffusion: unmasking steps (default: one per token)")
  g.add_argument("--block-length", type=int, default=0,
                 help="masked diffusion: semi-autoregressive block length (default: all)")
  g.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
  g.add_argument("--cfg-scale", type=float, default=0.0, help="masked diffusion: guidance")
  k = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
  k.add_argument("--out", required=True, help="where to write tokenizer.json")
  k.add_argument("--vocab-size", type=int, default=4096)
  k.add_argument("--source", default="stdlib", help='"stdlib" or a folder of text files')
  k.add_argument("--max-docs", type=int, default=None)
  k.set_defaults(fn=cmd_tokenizer)
  h = sub.add_parser("import-hf", help="make a run directory from a local HF Llama checkpoint")
  h.add_argument("hf_dir", help="directory with config.json and *.safetensors")
  h.add_argument("--workdir", required=True)
  h.add_argument("--tokenizer", default=None,
                 help="tokenizer spec (default: the tokenizer.json in hf_dir)")
  h.add_argument("--config", default=None, help="TOML for the training settings (optional)")
  h.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
  h.set_defaults(fn=cmd_import_hf)
  qz = sub.add_parser("quantize", help="post-training quantization and packed export")
  qz.add_argument("--workdir", required=True, help="a run directory made by `jaxllm train`")
  qz.add_argument("--out", default=None, help="output folder (default: WORKDIR/packed)")
  qz.add_argument("--weight", default=None, metavar="SPEC",
                  help="one spec for every block projection, e.g. minmax:4, paretoq:1.58")
  qz.add_argument("--rule", nargs="*", default=[], metavar="REGEX=SPEC",
                  help="ordered rules on module paths (first match wins)")
  qz.add_argument("--mixed", default=None, metavar="HIGH,LOW",
                  help="Unsloth-style: attention and the first layers at HIGH, the rest LOW")
  qz.add_argument("--high-first-layers", type=int, default=1)
  qz.add_argument("--eval-batches", type=int, default=8,
                  help="held-out batches to compare packed and float bits/byte (0: skip)")
  qz.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
  qz.set_defaults(fn=cmd_quantize)
  _add_sr_parser(sub)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"jaxllm {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
