"""Small-scale VARSR experiments on the embedded scikit-image photos (x4, VARSR's milder
degradation), evaluated on the held-out photos (`jaxllm.data.images.HELD_OUT_PHOTOS`).

  python experiments/varsr/run.py all     # train, eval, timing (the results page's command)
  python experiments/varsr/run.py train   [--vq-steps 700] [--sr-steps 350] [--out runs/varsr]
  python experiments/varsr/run.py eval    [--seeds 2]      # -> <out>/eval.json, panels
  python experiments/varsr/run.py timing                   # -> <out>/timing.json, plot

train   stage 1: the "small" multi-scale VQ-VAE (64 px, 8x down, scales 1,2,3,4,6,8, V 512) on
        random crops; stage 2: VARSR "small" (4 blocks, width 128, SA-RoPE, LR prefix, refiner
        3 x 128, 10% negative-quality targets) on (HR crop, degraded LR) pairs; the two ablations
        at the same steps (learned absolute positions; additive LR conditioning instead of the
        prefix); and the regression CNN (`jaxllm.models.srcnn.small`, L1) on the same pairs, the
        same steps and batch, at about the same FLOPs per step. Each is a `jaxllm sr train` run
        directory under --out (resumable); wall-clock, CPU time and XLA's FLOPs per step go to
        <out>/train.json.
eval    every held-out photo, degraded `--seeds` times with fixed seeds (varsr_x4, x4): bicubic
        upsampling of the LR; the CNN; the VQ-VAE's own reconstruction of the HR (the ceiling of
        token prediction on this tokenizer) and its decoder on the unquantised latents (the
        ceiling with a perfect refiner); VARSR tiled over the image with the refiner on / off and
        image CFG off (conditional sampling) / 2 / 6; the two ablations. PSNR / SSIM on Y
        (border 4) and NIQE. Comparison panels (256-pixel crops) go to --img.
ceiling the tokenizer's ceilings (PSNR of the VQ-VAE's reconstruction of the held-out HR photos)
        against VQ-VAE training length: the `train` run and longer ones (--ceiling-steps).
lr-use  does a trained model read its LR? Teacher-forced token accuracy and cross-entropy per
        scale on held-out crops with each crop's own LR against the LR of another crop (rolled
        across the batch); for the `train` runs and any --runs.
transfer the prefix VARSR and the additive ablation trained (--sr-steps) on a longer-trained
        tokenizer (--vq-run, e.g. the 4200-step run of `ceiling`), scored like `eval` (bicubic,
        the tokenizer's ceilings, refiner on / off, image CFG off / 2 / 6) and by `lr-use`.
fidelity the transfer model (--sr-steps) decoded for PSNR: with its tokenizer's decoder tuned
        alone (--decoder-steps, MSE; encoder and codebook frozen, so the tokens and the transfer
        model trained on them stay valid), the refiner at temperature 1 and 0, and the x8
        geometric self-ensemble (also of the CNN); scored like `eval`.
cfw     StableSR's controllable feature wrapping for the fidelity model: an encoder of the
        bicubic LR fused into the tuned decoder (frozen), trained (--cfw-steps, MSE) on what the
        transfer model generates (greedy tokens, refiner at temperature 0); scored like `eval`
        at fidelity weights --cfw-weights (0 = the fidelity page's best decoding), on the
        held-out and the training photos; decode time with and without it. --cfw-adv W
        fine-tunes the MSE run of --cfw-init-steps with StableSR's adversarial term instead.
timing  one jitted generation (KV cache; refiner on and off; no CFG) against one jitted
        teacher-forced forward of the same sequence, same batch, same process, best of 10; for the
        trained models, then for random-init models with 4 to 8 scales (final grid 8 x 8) and
        VAR's 10-scale schedule; plot of time against the number of scales.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm.data import degradations as deg
from jaxllm.data import images
from jaxllm.eval.sr_metrics import sr_metrics
from jaxllm.models.var import varsr as varsr_lib
from jaxllm.models.var import vqvae as vqvae_lib
from jaxllm.train import sr
from jaxllm.train.metrics import pyplot, save_json

SCALE = 4
SR_RUNS = {  # run name -> stage-2 options beyond the shared ones
    "sr": dict(stage="sr"),
    "sr_learned": dict(stage="sr", varsr_overrides=('positions="learned"',)),
    "sr_additive": dict(stage="sr", varsr_overrides=('conditioning="additive"',)),
    "cnn": dict(stage="cnn", cnn_preset="small"),
}


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def train_timed(cfg: sr.SRTrainConfig, label: str) -> dict:
  """`sr.train(cfg)` (resuming if its run exists) -> {"wall_s", "cpu_s", "final" (the last
  logged metrics)}, with one line printed: label, steps, wall and CPU minutes, last metrics."""
  t, c = time.perf_counter(), _cpu_seconds()
  last = sr.train(cfg)["metrics"]
  wall, cpu = time.perf_counter() - t, _cpu_seconds() - c
  print(f"{label}: {cfg.steps} steps in {wall / 60:.1f} min wall ({cpu / 60:.1f} CPU-min); "
        f"last {last}", flush=True)
  return {"wall_s": wall, "cpu_s": cpu, "final": last}


def run_configs(args) -> dict[str, sr.SRTrainConfig]:
  out = Path(args.out)
  common = dict(batch_size=args.batch_size, lr=args.lr, progress=not args.no_progress,
                log_every=50, save_every=0, scale=SCALE, seed=0)
  cfgs = {"vq": sr.SRTrainConfig(stage="vqvae", workdir=str(out / "vq"), vqvae_preset="small",
                                 steps=args.vq_steps, **common)}
  crop = vqvae_lib.small().image_size  # the CNN sees VARSR's crops
  for name, opts in SR_RUNS.items():
    cfgs[name] = sr.SRTrainConfig(workdir=str(out / name), vqvae_dir=str(out / "vq"),
                                  varsr_preset=args.varsr_size, crop_size=crop,
                                  steps=args.sr_steps,
                                  **opts, **common)
  return cfgs


def cmd_train(args) -> None:
  out = Path(args.out)
  record_path = out / "train.json"
  record = json.loads(record_path.read_text()) if record_path.is_file() else {}
  for name, cfg in run_configs(args).items():
    done = name in record and record[name]["steps"] == cfg.steps
    if name in args.skip or (done and (Path(cfg.workdir) / "checkpoints").is_dir()):
      continue  # left out, or already trained (its timings kept)
    entry = {"steps": cfg.steps, "batch_size": cfg.batch_size, **train_timed(cfg, name),
             "gflop_per_step": sr.train_step_flops(cfg) / 1e9}
    # re-read: runs may train in parallel processes (`--skip`), each adding its own entry
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record[name] = entry
    save_json(out, "train", record)
    print(f"{name}: {entry['gflop_per_step']:.1f} GFLOP/step", flush=True)


# ------------------------------------------------------------------------------------------ eval


def heldout_pairs(seeds: int, photos=images.HELD_OUT_PHOTOS):
  """[(name, HR, LR)]: each photo (by default the held-out ones) degraded with seeds 1000 + k
  (deterministic)."""
  out = []
  for name in photos:
    photo = images.skimage_photo(name)
    for k in range(seeds):
      hr, lr = deg.degrade(photo, 1000 + k, deg.varsr_x4(scale=SCALE))
      out.append((f"{name}/{k}", hr, lr))
  return out


def _vq_ceilings(vq, p, S: int):
  """A function HR image -> {"tokens": the VQ-VAE's reconstruction through its tokens,
  "latents": its decoder on the unquantised latents}, both tiled like the SR model (scale 1);
  compiled once, for every image it is called on."""
  apply = lambda *a, **k: vq.apply({"params": p}, *a, **k)  # noqa: E731
  fns = {"tokens": jax.jit(lambda x: apply(apply(x, method="img_to_idx"), method="idx_to_img")),
         "latents": jax.jit(lambda x: apply(apply(x, method="features"), method="decode_fhat"))}

  def ceilings(hr: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for key, rec in fns.items():
      def fn(tiles, rec=rec):
        return (np.asarray(jnp.clip(rec(jnp.asarray(tiles) * 2 - 1), -1, 1)) + 1) / 2
      out[key] = np.clip(varsr_lib.upscale_tiled(fn, hr, S, 1, overlap=S // 8, batch=8), 0, 1)
    return out

  return ceilings


def run_tag(args) -> str:
  """Names a transfer run: its tokenizer run, SR steps and (unless "small") VARSR size."""
  size = "" if args.varsr_size == "small" else f"_{args.varsr_size}"
  return f"{Path(args.vq_run).name}_{args.sr_steps}{size}"


def transfer_dir(out: Path, args) -> Path:
  """Where `transfer` puts its runs (`sr`, `sr_additive`) for `--vq-run`, `--sr-steps` and
  `--varsr-size`."""
  return out / f"on_{run_tag(args)}"


VQ_TOKENS = "VQ-VAE reconstruction of HR (ceiling)"
VQ_LATENTS = "VQ-VAE decoder, unquantised latents (perfect-refiner ceiling)"
MAIN = "VARSR (refiner, CFG off)"
NO_REFINER = "VARSR (no refiner, CFG off)"
CNN = "CNN baseline (L1, same steps and FLOPs)"
PANEL = 256  # HR side of the comparison panels' crop


def score_heldout(variants: dict, ceiling_model: sr.SRModel | dict[str, sr.SRModel], args,
                  panel: dict[str, str] | None, prefix: str,
                  photos=images.HELD_OUT_PHOTOS, seeds: int | None = None) -> dict:
  """Scores bicubic, `ceiling_model`'s tokenizer ceilings (a dict: each model's, its key
  appended to the row names; {} for none) and every variant (name -> (model, `upscale_image`
  options)) on `photos` (the held-out ones unless given), each degraded `seeds` times (default
  --seeds); saves one centre-crop panel per photo (LR | bicubic | the `panel` variants, by
  label | HR; none if `panel` is None) as <img>/<prefix>_<photo>.png; prints the table.
  -> {"images", "per_image", "mean", "upscale_seconds_total"}."""
  ceilings = ceiling_model if isinstance(ceiling_model, dict) else {"": ceiling_model}
  ceilings = {key: _vq_ceilings(m.vqvae, m.vq_params, m.config.image_size)
              for key, m in ceilings.items()}
  rows: dict[str, list[dict]] = {"bicubic": []}
  for key in ceilings:
    rows.update({VQ_TOKENS + key: [], VQ_LATENTS + key: []})
  rows.update({k: [] for k in variants})
  seconds: dict[str, float] = {}
  ceiling_cache: dict[str, dict] = {}  # this photo's ceiling metrics, per ceiling model
  pairs = heldout_pairs(args.seeds if seeds is None else seeds, photos)
  Path(args.img).mkdir(parents=True, exist_ok=True)
  for name, hr, lr in tqdm(pairs, desc="images", disable=args.no_progress):
    rows["bicubic"].append(sr_metrics(sr.bicubic_upscale(lr, SCALE), hr, SCALE, True))
    for key, reconstruct in ceilings.items():
      if name.endswith("/0"):  # the ceilings depend on the HR photo, not on its degradation
        rec = reconstruct(hr)
        ceiling_cache[key] = {k: sr_metrics(rec[k], hr, SCALE, True) for k in rec}
      rows[VQ_TOKENS + key].append(ceiling_cache[key]["tokens"])
      rows[VQ_LATENTS + key].append(ceiling_cache[key]["latents"])
    outs = {}
    for vname, (model, opts) in variants.items():
      t = time.perf_counter()
      outs[vname] = sr.upscale_image(model, lr, SCALE, batch=16, **opts)
      seconds[vname] = seconds.get(vname, 0.0) + time.perf_counter() - t
      rows[vname].append(sr_metrics(outs[vname], hr, SCALE, True))
    if panel is not None and name.endswith("/0"):  # one panel per photo, its first degradation
      H, W = hr.shape[:2]
      y, x = (H - PANEL) // 2 // SCALE * SCALE, (W - PANEL) // 2 // SCALE * SCALE
      crop = lambda a, s=1: a[y // s:(y + PANEL) // s, x // s:(x + PANEL) // s]  # noqa: E731
      image = sr.comparison_image(crop(lr, SCALE), {label: crop(outs[v])
                                                    for label, v in panel.items()},
                                  SCALE, crop(hr))
      images.save_image(Path(args.img) / f"{prefix}_{name.split('/')[0]}.png",
                        image.astype(np.float32) / 255.0)
  table = {k: {m: statistics.mean(r[m] for r in v) for m in ("psnr", "ssim", "niqe")}
           for k, v in rows.items()}
  print("| variant | PSNR (Y) | SSIM (Y) | NIQE |\n|---|---|---|---|")
  for k, v in table.items():
    print(f"| {k} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['niqe']:.2f} |")
  return {"images": [p[0] for p in pairs], "per_image": rows, "mean": table,
          "upscale_seconds_total": seconds}


def cmd_eval(args) -> None:
  out = Path(args.out)
  main = sr.load_sr(out / "sr")
  variants = {  # name -> (model, upscale_image options)
      CNN: (sr.load_sr(out / "cnn"), dict()),
      MAIN: (main, dict()),
      NO_REFINER: (main, dict(refine=False)),
      "VARSR (refiner, CFG 2)": (main, dict(cfg=2.0)),
      "VARSR (refiner, CFG 6)": (main, dict(cfg=6.0)),
      "ablation: learned absolute positions (refiner, CFG off)": (
          sr.load_sr(out / "sr_learned"), dict()),
      "ablation: additive LR conditioning (refiner, CFG off)": (
          sr.load_sr(out / "sr_additive"), dict()),
  }
  result = score_heldout(variants, main, args, prefix="varsr", panel={
      "CNN": CNN, "VARSR": MAIN})
  result["train"] = {k: json.loads((out / k / "config.json").read_text())["train"]
                     for k in ("vq", *SR_RUNS)}
  save_json(out, "eval", result)


# --------------------------------------------------------------------------------------- ceiling


def cmd_ceiling(args) -> None:
  """The tokenizer's ceiling against its training length: the VQ-VAE of `train` (700 steps by
  default) and longer runs of the same configuration (`--ceiling-steps`, each its own run under
  <out>/vq_<steps>), each scored on the held-out HR photos through its tokens and through its
  decoder on unquantised latents (the two ceilings of the eval table)."""
  out = Path(args.out)
  base = run_configs(args)["vq"]
  pairs = heldout_pairs(args.seeds)
  bicubic = [sr_metrics(sr.bicubic_upscale(lr, SCALE), hr, SCALE)["psnr"] for _, hr, lr in pairs]
  result = {"bicubic_psnr": statistics.mean(bicubic), "runs": {}}
  for steps in sorted({args.vq_steps, *args.ceiling_steps}):
    cfg = base if steps == args.vq_steps else dataclasses.replace(
        base, steps=steps, workdir=str(out / f"vq_{steps}"))
    if not (Path(cfg.workdir) / "checkpoints").is_dir():
      train_timed(cfg, f"vq {steps}")
    vq, p = sr.load_vqvae(cfg.workdir)
    reconstruct = _vq_ceilings(vq, p, vq.config.image_size)
    rows = {"tokens": [], "latents": []}
    for name, hr, _ in pairs:
      if not name.endswith("/0"):
        continue  # the ceilings do not depend on the degradation seed
      rec = reconstruct(hr)
      for k in rows:
        rows[k].append(sr_metrics(rec[k], hr, SCALE)["psnr"])
    result["runs"][steps] = {k: statistics.mean(v) for k, v in rows.items()}
    print(f"vq {steps} steps: ceiling PSNR through tokens {result['runs'][steps]['tokens']:.2f}, "
          f"unquantised latents {result['runs'][steps]['latents']:.2f} "
          f"(bicubic of the degraded LR {result['bicubic_psnr']:.2f})", flush=True)
    save_json(out, "ceiling", result)


# ---------------------------------------------------------------------------------------- lr-use


def lr_dependence(m: sr.SRModel, n: int = 48, seed: int = 123) -> list[dict]:
  """Per scale: teacher-forced token accuracy and CE on `n` held-out crops (HR tokenised by the
  model's VQ-VAE) with each crop's own LR ("true") and with the LR of the next crop ("rolled").
  A model that ignores its LR scores the same on both."""
  c = m.config
  photos = [images.skimage_photo(name) for name in images.HELD_OUT_PHOTOS]
  ds = images.sr_dataset(photos, c.image_size, deg.varsr_x4(scale=SCALE), seed)
  batch = {k: np.stack([ds[i][k] for i in range(n)]) for k in ("hr", "lr")}

  @jax.jit
  def scores(params, vq_params, lr, hr):  # -> per-token (hit, CE) [n, L]
    vq = functools.partial(m.vqvae.apply, {"params": vq_params})
    idx, _, _ = vq(hr, method="img_to_pyramid")
    target = jnp.concatenate(idx, 1)
    logits, _ = m.model.apply({"params": params}, lr, jnp.zeros((n,), jnp.int32),
                              vq(idx, method="idx_to_var_input"))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return (jnp.argmax(logits, -1) == target,
            -jnp.take_along_axis(logp, target[..., None], -1)[..., 0])

  stats = {}
  for key, lr in (("true", batch["lr"]), ("rolled", np.roll(batch["lr"], 1, axis=0))):
    hit, ce = scores(m.params, m.vq_params, jnp.asarray(lr), jnp.asarray(batch["hr"]))
    stats[key] = [(float(hit[:, lo:hi].mean()), float(ce[:, lo:hi].mean()))
                  for lo, hi in c.begin_ends()]
  return [{"scale": pn, "acc_true": t[0], "acc_rolled": r[0], "ce_true": t[1],
           "ce_rolled": r[1]} for pn, t, r in zip(c.patch_nums, stats["true"], stats["rolled"])]


def _print_lr_use(name: str, rows: list[dict]) -> None:
  print(f"{name}: scale | accuracy own LR / other LR | CE own LR / other LR")
  for r in rows:
    print(f"  {r['scale']:2d} | {r['acc_true']:.3f} / {r['acc_rolled']:.3f} | "
          f"{r['ce_true']:.3f} / {r['ce_rolled']:.3f}")


def cmd_lr_use(args) -> None:
  out = Path(args.out)
  runs = {name: out / name for name in ("sr", "sr_learned", "sr_additive")}
  runs.update({str(r): Path(r) for r in args.runs})
  result = {}
  for name, path in runs.items():
    result[name] = lr_dependence(sr.load_sr(path))
    _print_lr_use(name, result[name])
  save_json(out, "lr_use", result)


# -------------------------------------------------------------------------------------- transfer


def cmd_transfer(args) -> None:
  """Prefix VARSR and the additive ablation on the tokenizer run `--vq-run`, `--sr-steps` each,
  scored on the held-out photos (and by `lr-use`); -> <out>/transfer_<vq run>_<steps>.json, a
  panel per held-out photo and the PSNR-against-steps plot of all transfer runs on the tokenizer.
  Trained runs are reused, so a rerun only re-scores."""
  out, vq_run = Path(args.out), Path(args.vq_run)
  if not (vq_run / "checkpoints").is_dir():
    raise SystemExit(f"--vq-run {vq_run} has no checkpoints: train it first (e.g. `run.py "
                     f"ceiling --ceiling-steps 4200` makes {out / 'vq_4200'}).")
  if "sr" in args.skip:
    raise SystemExit("transfer scores the prefix model: do not --skip sr.")
  tag = transfer_dir(out, args).name
  base = run_configs(args)
  previous = out / f"transfer_{run_tag(args)}.json"
  result = {"vq_run": str(vq_run), "sr_steps": args.sr_steps,  # training records kept on reruns
            "varsr_size": args.varsr_size,
            "train": json.loads(previous.read_text())["train"] if previous.is_file() else {}}
  models = {}
  for name in [n for n in ("sr", "sr_additive") if n not in args.skip]:
    cfg = dataclasses.replace(base[name], vqvae_dir=str(vq_run),
                              workdir=str(out / tag / name))
    if name not in result["train"]:  # not trained to the end yet (`sr.train` resumes)
      result["train"][name] = train_timed(cfg, f"{tag}/{name}")
      save_json(out, previous.stem, result)  # a rerun after an interruption keeps this model
    models[name] = sr.load_sr(cfg.workdir)
  variants = {MAIN: (models["sr"], dict()),
              NO_REFINER: (models["sr"], dict(refine=False)),
              "VARSR (refiner, CFG 2)": (models["sr"], dict(cfg=2.0)),
              "VARSR (refiner, CFG 6)": (models["sr"], dict(cfg=6.0))}
  if "sr_additive" in models:
    variants["ablation: additive LR conditioning (refiner, CFG off)"] = (models["sr_additive"],
                                                                         dict())
  result.update(score_heldout(variants, models["sr"], args, prefix=f"varsr_{tag}",
                             panel={"VARSR": MAIN}))
  result["lr_use"] = {name: lr_dependence(m) for name, m in models.items()}
  save_json(out, previous.stem, result)
  for name, r in result["lr_use"].items():
    _print_lr_use(name, r)
  plot_transfer(out, vq_run.name, Path(args.img) / f"varsr_transfer_{vq_run.name}.png")


# -------------------------------------------------------------------------------------- fidelity


TUNED, T0, SE = ", tuned decoder", ", refiner temperature 0", ", self-ensemble x8"
WAV, MBR = ", wavelet colour fix", ", MBR tokens"


def cmd_fidelity(args) -> None:
  """Decoding the transfer model (`transfer --sr-steps`) for fidelity: the decoder of its
  tokenizer `--vq-run` tuned alone for `--decoder-steps` (`jaxllm sr train --stage decoder`:
  MSE, encoder and codebook frozen, so the tokens do not change), the refiner sampled at
  temperature 1 (VARSR's) and 0 (the sampler's mean path), and the geometric self-ensemble
  (also for the page's CNN, if trained), StableSR's wavelet colour fix instead of AdaIN, and
  minimum-Bayes-risk tokens (`upscale --mbr-tokens`) with and without the refiner;
  then the best decoding and the CNN on the training photos (one fresh degradation each), to
  tell a generalisation gap from a fitting one; -> <out>/decoder_<vq run>_<steps>.json (the
  tuning record, kept on reruns), <out>/fidelity_<run tag>.json (the scores), a panel per
  held-out photo."""
  out, vq_run = Path(args.out), Path(args.vq_run)
  sr_dir = transfer_dir(out, args) / "sr"
  if not (sr_dir / "checkpoints").is_dir():
    raise SystemExit(f"{sr_dir} has no checkpoints: train it first with `run.py transfer "
                     f"--vq-run {vq_run} --sr-steps {args.sr_steps} --varsr-size "
                     f"{args.varsr_size} --skip sr_additive`.")
  name = decoder_run(args).name
  cfg = sr.SRTrainConfig(stage="decoder", vqvae_dir=str(vq_run), workdir=str(out / name),
                         steps=args.decoder_steps, batch_size=args.batch_size,
                         lr=args.decoder_lr, scale=SCALE, seed=0, log_every=50,
                         progress=not args.no_progress)
  record = out / f"{name}.json"
  if not record.is_file():  # not tuned to the end yet (`sr.train` resumes)
    save_json(out, record.stem, {"train": {**train_timed(cfg, name),
                                           "config": dataclasses.asdict(cfg)}})
  result = {"vq_run": str(vq_run), "sr_run": str(sr_dir), "decoder_run": cfg.workdir,
            "decoder_train": json.loads(record.read_text())["train"]}
  original, tuned = sr.load_sr(sr_dir), sr.load_sr(sr_dir, decoder=cfg.workdir)
  t0 = dict(temperature=0.0)
  variants = {MAIN: (original, dict()),
              MAIN + T0: (original, t0),
              MAIN + TUNED: (tuned, dict()),
              MAIN + TUNED + T0: (tuned, t0),
              NO_REFINER + TUNED: (tuned, dict(refine=False)),
              "VARSR (refiner, CFG 2)" + TUNED + T0: (tuned, dict(cfg=2.0, **t0)),
              MAIN + TUNED + T0 + SE: (tuned, dict(self_ensemble=True, **t0)),
              MAIN + TUNED + T0 + WAV: (tuned, dict(color_fix="wavelet", **t0)),
              NO_REFINER + TUNED + MBR: (tuned, dict(refine=False,
                                                                         mbr_tokens=True)),
              MAIN + TUNED + T0 + MBR: (tuned, dict(mbr_tokens=True, **t0))}
  if (out / "cnn" / "checkpoints").is_dir():
    cnn = sr.load_sr(out / "cnn")
    variants.update({CNN: (cnn, dict()), CNN + SE: (cnn, dict(self_ensemble=True))})
  result.update(score_heldout(variants, {"": original, TUNED: tuned}, args,
                              prefix=f"varsr_fidelity_{run_tag(args)}",
                              panel={"VARSR": MAIN, "tuned, T 0": MAIN + TUNED + T0}))
  # is the gap to bicubic a generalisation gap? The best decoding on the training photos
  print(f"on the training photos {list(images.TRAIN_PHOTOS)}, one fresh degradation each:",
        flush=True)
  result["train_photos"] = score_heldout(
      {k: variants[k] for k in (MAIN + TUNED + T0, CNN) if k in variants}, {}, args,
      panel=None, prefix="", photos=images.TRAIN_PHOTOS, seeds=1)
  save_json(out, f"fidelity_{run_tag(args)}", result)


def decoder_run(args) -> Path:
  """The decoder-stage run `fidelity` tunes for `--vq-run` and `--decoder-steps`."""
  return Path(args.out) / f"decoder_{Path(args.vq_run).name}_{args.decoder_steps}"


def cmd_cfw(args) -> None:
  """StableSR's CFW (`jaxllm sr train --stage cfw`) for the transfer model (`--sr-steps`,
  `--varsr-size`) with `fidelity`'s tuned decoder: trained `--cfw-steps`, scored at each of
  `--cfw-weights` (w 0 is the tuned decoder alone), then the plain and the fused decode timed
  against one generation. `--cfw-adv W` > 0: the MSE run of `--cfw-init-steps` fine-tuned with
  the adversarial term (`cfw.CFWConfig.adv_weight`), named <tag>_<steps>_adv<W>_from<init>.
  -> <out>/cfw_<name>.json (training record, kept on reruns), <out>/cfw_scores_<name>[_seeds<n>]
  .json, a panel per held-out photo, the NIQE / PSNR plot (two or more weights)."""
  out = Path(args.out)
  sr_dir, dec = transfer_dir(out, args) / "sr", decoder_run(args)
  for need, how in ((sr_dir, "transfer"), (dec, "fidelity")):
    if not (need / "checkpoints").is_dir():
      raise SystemExit(f"{need} has no checkpoints: run `run.py {how}` with the same --vq-run, "
                       "--sr-steps and --varsr-size first.")
  name = f"cfw_{run_tag(args)}_{args.cfw_steps}"
  adv = {}
  if args.cfw_adv:  # StableSR's adversarial term, fine-tuning the MSE run of --cfw-init-steps
    start = out / f"cfw_{run_tag(args)}_{args.cfw_init_steps}"
    if not (start / "checkpoints").is_dir():
      raise SystemExit(f"{start} has no checkpoints: run `run.py cfw --cfw-steps "
                       f"{args.cfw_init_steps}` (no --cfw-adv) first.")
    name += f"_adv{args.cfw_adv:g}_from{args.cfw_init_steps}"
    adv = dict(cfw_overrides=(f"adv_weight={args.cfw_adv}",), cfw_init=str(start))
  cfg = sr.SRTrainConfig(stage="cfw", sr_dir=str(sr_dir), decoder_dir=str(dec), **adv,
                         workdir=str(out / name), steps=args.cfw_steps,
                         batch_size=args.batch_size, lr=args.cfw_lr, scale=SCALE, seed=0,
                         log_every=50, progress=not args.no_progress)
  record = out / f"{name}.json"
  if not record.is_file():  # not trained to the end yet (`sr.train` resumes)
    save_json(out, name, {"train": {**train_timed(cfg, name), "config": dataclasses.asdict(cfg),
                                    "gflop_per_step": sr.train_step_flops(cfg) / 1e9}})
  result = {"sr_run": str(sr_dir), "decoder_run": str(dec), "cfw_run": cfg.workdir,
            "cfw_train": json.loads(record.read_text())["train"]}
  tuned, fused = sr.load_sr(sr_dir, decoder=dec), sr.load_sr(cfg.workdir)
  t0 = dict(temperature=0.0)
  best = MAIN + TUNED + T0
  variants = {best: (tuned, t0)}
  for w in args.cfw_weights:
    variants[f"{best}, CFW w {w:g}"] = (fused, dict(cfw_weight=w, **t0))
  if (out / "cnn" / "checkpoints").is_dir():
    variants[CNN] = (sr.load_sr(out / "cnn"), dict())
  top = f"{best}, CFW w {max(args.cfw_weights):g}"
  result.update(score_heldout(variants, {}, args, prefix=f"varsr_{name}",  # first seeds' panels
                              panel={"VARSR, tuned, T 0": best, "+ CFW": top}))
  print(f"on the training photos {list(images.TRAIN_PHOTOS)}, one fresh degradation each:",
        flush=True)
  result["train_photos"] = score_heldout(
      {k: variants[k] for k in (best, top, CNN) if k in variants}, {}, args, panel=None,
      prefix="", photos=images.TRAIN_PHOTOS, seeds=1)
  result["timing"] = _cfw_times(fused, args.batch)
  tag = name.removeprefix("cfw_") + ("" if args.seeds == 2 else f"_seeds{args.seeds}")
  save_json(out, f"cfw_scores_{tag}", result)
  if len(args.cfw_weights) > 1:
    plot_cfw(result["mean"], Path(args.img) / f"varsr_cfw_{tag}_tradeoff.png")


def plot_cfw(mean: dict, path: Path) -> None:
  """Held-out NIQE against PSNR for every CFW weight w (a line, labelled by w), bicubic and the
  CNN; the issue's target is the quadrant right of and below bicubic."""
  pts = sorted((float(k.rsplit(" ", 1)[1]), v) for k, v in mean.items() if ", CFW w " in k)
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot([v["psnr"] for _, v in pts], [v["niqe"] for _, v in pts], "o-",
          label="VARSR + CFW (tuned decoder, T 0)")
  for w, v in pts:
    ax.annotate(f"w {w:g}", (v["psnr"], v["niqe"]), textcoords="offset points", xytext=(4, 4),
                fontsize=7)
  bic = mean["bicubic"]
  ax.plot([bic["psnr"]], [bic["niqe"]], "rs", label="bicubic")
  if CNN in mean:
    ax.plot([mean[CNN]["psnr"]], [mean[CNN]["niqe"]], "k^", label="CNN baseline")
  x1, y0 = ax.get_xlim()[1], ax.get_ylim()[0]
  ax.fill_between([bic["psnr"], x1], y0, bic["niqe"], color="green", alpha=0.1,
                  label="target: better than bicubic on both")
  ax.set_xlim(right=x1)
  ax.set_ylim(bottom=y0)
  ax.set_xlabel("held-out PSNR (Y), dB (higher is better)")
  ax.set_ylabel("NIQE (lower is better)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _cfw_times(m: sr.SRModel, batch: int) -> dict[str, float]:
  """Best-of-10 ms, `batch` LR tiles: generation (greedy, refiner at temperature 0), the plain
  decode and the CFW decode of its output."""
  s = m.tile
  lr = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, s, s, 3)), jnp.float32)
  gen = lambda: varsr_lib.upscale(m.model, m.params, m.vqvae, m.vq_params, lr,  # noqa: E731
                                  jax.random.key(0), **sr.CFW_DECODING)["f_hat"]
  f_hat = gen()
  plain = jax.jit(lambda f: m.vqvae.apply({"params": m.vq_params}, f, method="decode_fhat"))
  fused = jax.jit(lambda f, x: m.cfw[0].apply({"params": m.cfw[1]}, f, x, 1.0))
  t = _best_times([gen, lambda: plain(f_hat), lambda: fused(f_hat, lr)])
  r = {"generate_ms": 1e3 * t[0], "decode_ms": 1e3 * t[1], "cfw_decode_ms": 1e3 * t[2]}
  print(f"{batch} tiles: generate {r['generate_ms']:.1f} ms, decode {r['decode_ms']:.1f} ms, "
        f"CFW decode {r['cfw_decode_ms']:.1f} ms", flush=True)
  return r


def plot_transfer(out: Path, vq_name: str, path: Path) -> None:
  """Held-out PSNR against SR training steps for every `transfer` run of the "small" VARSR on one
  tokenizer, with bicubic and the tokenizer's two ceilings as horizontal lines."""
  runs = []
  for f in out.glob(f"transfer_{vq_name}_*.json"):
    r = json.loads(f.read_text())
    if r.get("varsr_size", "small") == "small":
      runs.append((r["sr_steps"], r["mean"]))
  if not runs:
    return
  runs.sort(key=lambda t: t[0])
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for key, label, style in ((MAIN, "VARSR, LR prefix", "o-"),
                            ("ablation: additive LR conditioning (refiner, CFG off)",
                             "additive LR conditioning", "s--")):
    pts = [(s, m[key]["psnr"]) for s, m in runs if key in m]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
  last = runs[-1][1]
  for key, label, color in (("bicubic", "bicubic of the degraded LR", "red"),
                            (VQ_TOKENS, "tokenizer ceiling (perfect tokens)", "gray"),
                            (VQ_LATENTS, "perfect tokens and refiner", "black")):
    ax.axhline(last[key]["psnr"], ls=":", color=color, label=label)
  ax.set_xlabel("SR-stage training steps (batch 8)")
  ax.set_ylabel("held-out PSNR (Y), dB")
  ax.set_title(f"x4 on the held-out photos, tokenizer {vq_name}", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------------------- timing


def _best_times(fns, repeats: int = 10) -> list[float]:
  """Best wall time of each `fn()` over `repeats` rounds, the functions alternating within a
  round so that both see the same machine load (the machine may be shared)."""
  for fn in fns:
    jax.block_until_ready(fn())  # compile
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      jax.block_until_ready(fn())
      best[i] = min(best[i], time.perf_counter() - t)
  return best


def _gen_vs_forward(model: varsr_lib.VARSR, params, vq, vq_params, batch: int,
                    refine: bool) -> dict[str, float]:
  """Best-of-10 wall time of `upscale` (KV cache, no CFG) and of one teacher-forced forward of
  the same sequence, same batch, both jitted."""
  c = model.config
  s = c.image_size // c.scale
  rng = np.random.default_rng(0)
  lr = jnp.asarray(rng.uniform(-1, 1, (batch, s, s, 3)), jnp.float32)
  label = jnp.zeros((batch,), jnp.int32)
  x = jnp.asarray(rng.normal(size=(batch, c.seq_len - c.patch_nums[0] ** 2, c.c_vae)),
                  jnp.float32)
  fwd = jax.jit(lambda p, a, b, x: model.apply({"params": p}, a, b, x))
  gen = lambda p, a: varsr_lib.upscale(model, p, vq, vq_params, a, jax.random.key(0),  # noqa
                                       cfg=None, refine=refine)["f_hat"]
  t_fwd, t_gen = _best_times([lambda: fwd(params, lr, label, x), lambda: gen(params, lr)])
  return {"forward_ms": 1e3 * t_fwd, "generate_ms": 1e3 * t_gen, "ratio": t_gen / t_fwd}


SWEEP = [(1, 2, 4, 8), (1, 2, 3, 4, 8), (1, 2, 3, 4, 6, 8), (1, 2, 3, 4, 5, 6, 8),
         (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]


def cmd_timing(args) -> None:
  out = Path(args.out)
  result = {"batch": args.batch, "device": jax.devices()[0].device_kind, "trained": {}}
  for name in ("sr", "sr_additive"):
    m = sr.load_sr(out / name)
    for refine in (True, False):
      r = _gen_vs_forward(m.model, m.params, m.vqvae, m.vq_params, args.batch, refine)
      r.update(tokens=m.config.prefix_len + m.config.seq_len)
      result["trained"][f"{name}, refiner {'on' if refine else 'off'}"] = r
      print(f"{name}, refiner {refine}: generate {r['generate_ms']:.1f} ms, teacher-forced "
            f"forward {r['forward_ms']:.1f} ms, ratio {r['ratio']:.2f}")
  sweep = []
  for pn in tqdm(SWEEP, desc="scale schedules", disable=args.no_progress):
    down = 64 // pn[-1]  # 64-pixel images: 8x (final grid 8) or 4x (final grid 16)
    vq_cfg = vqvae_lib.small(patch_nums=pn, ch_mult=(1, 2, 2, 4) if down == 8 else (1, 2, 4))
    vq = vqvae_lib.VQVAE(vq_cfg)
    vq_params = vq.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    c = sr.varsr_config_for(vq_cfg, SCALE, "small")
    model = varsr_lib.VARSR(c)
    params = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1, c.seq_len - 1, c.c_vae)))["params"]
    for refine in (True, False):
      r = _gen_vs_forward(model, params, vq, vq_params, args.batch, refine=refine)
      r.update(scales=len(pn), tokens=c.prefix_len + c.seq_len, patch_nums=list(pn),
               refine=refine)
      sweep.append(r)
      print(f"{len(pn)} scales {pn} ({r['tokens']} tokens), refiner {refine}: generate "
            f"{r['generate_ms']:.1f} ms, forward {r['forward_ms']:.1f} ms, ratio {r['ratio']:.2f}")
  result["sweep"] = sweep
  save_json(out, "timing", result)
  plot_timing(sweep, Path(args.img) / "varsr_timing.png")


def plot_timing(sweep: list[dict], path: Path) -> None:
  plt = pyplot()
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
  for refine, style in ((True, "o-"), (False, "s--")):
    rows = [r for r in sweep if r["refine"] == refine and r["patch_nums"][-1] == 8]
    k = [r["scales"] for r in rows]
    ax[0].plot(k, [r["generate_ms"] for r in rows], style,
               label=f"generation, refiner {'on' if refine else 'off'}")
    ax[1].plot(k, [r["ratio"] for r in rows], style, label=f"refiner {'on' if refine else 'off'}")
    var = [r for r in sweep if r["refine"] == refine and r["patch_nums"][-1] != 8]
    ax[1].plot([r["scales"] for r in var], [r["ratio"] for r in var], "*", ms=10,
               color=ax[1].lines[-1].get_color(), label=f"VAR's 10 scales to 16x16, refiner "
               f"{'on' if refine else 'off'}")
  rows = [r for r in sweep if r["refine"] and r["patch_nums"][-1] == 8]
  ax[0].plot([r["scales"] for r in rows], [r["forward_ms"] for r in rows], "^:", color="gray",
             label="one teacher-forced forward")
  ax[0].set_xlabel("number of scales (final grid 8 x 8)")
  ax[0].set_ylabel("ms per batch of 8 LR tiles")
  ax[0].legend(fontsize=8)
  ax[1].axhline(3.0, color="red", ls=":", label="target: 3x")
  ax[1].set_xlabel("number of scales")
  ax[1].set_ylabel("generation / forward")
  ax[1].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("exp", choices=["all", "train", "eval", "timing", "ceiling", "lr-use",
                                  "transfer", "fidelity", "cfw"])
  p.add_argument("--out", default="runs/varsr")
  p.add_argument("--img", default="docs/results/img")
  p.add_argument("--vq-steps", type=int, default=700)
  p.add_argument("--sr-steps", type=int, default=350)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--skip", nargs="*", default=[], choices=["vq", *SR_RUNS],
                 help="train: runs to leave out (eval needs them all); transfer: sr_additive")
  p.add_argument("--seeds", type=int, default=2, help="eval: degradations per held-out photo")
  p.add_argument("--batch", type=int, default=8, help="timing: LR tiles per call")
  p.add_argument("--ceiling-steps", type=int, nargs="*", default=[2100],
                 help="ceiling: longer VQ-VAE runs to score beside the --vq-steps one")
  p.add_argument("--runs", nargs="*", default=[],
                 help="lr-use: more SR run directories to probe beside the `train` ones")
  p.add_argument("--vq-run", default="runs/varsr/vq_4200",
                 help="transfer, fidelity: the tokenizer run to train the SR models on / tune")
  p.add_argument("--varsr-size", default="small", choices=sorted(sr.VARSR_SIZES),
                 help="transfer, fidelity: VARSR transformer size of the sr-stage runs (the "
                 "page's other commands use small)")
  p.add_argument("--decoder-steps", type=int, default=3000, help="fidelity: decoder tuning steps")
  p.add_argument("--decoder-lr", type=float, default=3e-4,
                 help="fidelity: the decoder's peak learning rate")
  p.add_argument("--cfw-steps", type=int, default=2000, help="cfw: training steps")
  p.add_argument("--cfw-lr", type=float, default=5e-4, help="cfw: peak learning rate")
  p.add_argument("--cfw-adv", type=float, default=0.0,
                 help="cfw: adversarial weight (cfw.CFWConfig.adv_weight); > 0 fine-tunes the "
                 "MSE run of --cfw-init-steps")
  p.add_argument("--cfw-init-steps", type=int, default=2000,
                 help="cfw --cfw-adv: the steps of the MSE cfw run to start from")
  p.add_argument("--cfw-weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                 help="cfw: fidelity weights w to score (0: the tuned decoder alone)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.varsr_size != "small" and args.exp not in ("transfer", "fidelity", "cfw"):
    p.error(f"--varsr-size is for transfer and fidelity (their runs are named by size); "
            f"{args.exp} uses the page's small runs.")
  t, c = time.perf_counter(), _cpu_seconds()
  for exp in (("train", "eval", "timing") if args.exp == "all" else (args.exp,)):
    {"train": cmd_train, "eval": cmd_eval, "timing": cmd_timing, "ceiling": cmd_ceiling,
     "lr-use": cmd_lr_use, "transfer": cmd_transfer, "fidelity": cmd_fidelity,
     "cfw": cmd_cfw}[exp](args)
  print(f"{args.exp}: {(time.perf_counter() - t) / 60:.1f} min wall, "
        f"{(_cpu_seconds() - c) / 60:.1f} CPU-min")


if __name__ == "__main__":
  main()
