"""Super-resolution training and inference drivers: the VQ-VAE stage, the VARSR stage, the CNN
baseline, upscaling.

Five stages, each a run directory (`workdir`) holding `config.json`, Orbax checkpoints
(`jaxllm.train.checkpoint.Checkpointer`), `metrics.jsonl` and TensorBoard events:

1. `stage="vqvae"`: the multi-scale VQ-VAE (`models/var/vqvae.py`) on random HR crops of
   `image_size` pixels; loss = L1 reconstruction + VQ loss; codebook usage and perplexity are
   logged every `log_every` steps.
2. `stage="sr"`: VARSR (`models/var/varsr.py`) on (HR crop, degraded LR) pairs from
   `jaxllm.data.images.sr_dataset`, the VQ-VAE of stage 1 frozen (`vqvae_dir`) and copied into
   this run's checkpoint, so one directory is enough to upscale; loss = CE + diff_weight x
   diffusion loss; teacher-forced token accuracy is logged. VARSR's shape (vocabulary, Cvae,
   scales, output size) is taken from the VQ-VAE; `varsr_preset` sets the transformer's size.
3. `stage="decoder"`: the VQ-VAE of `vqvae_dir` with only its decoder (`post_quant_conv` and
   `decoder`) trained on, MSE loss on reconstructions from the quantised and the unquantised
   latents (`vqvae.decoder_loss_fn`). Tokens are unchanged, so an sr-stage run trained on the
   original decodes with the tuned decoder (`load_sr(..., decoder=DIR)`, `jaxllm sr upscale
   --decoder DIR`); the original VQ-VAE is copied into the checkpoint, and `load_vqvae` of this
   run gives the original with the tuned decoder.
4. `stage="cfw"`: StableSR's controllable feature wrapping (`models/var/cfw.py`) for a trained
   sr-stage run (`sr_dir`, with `decoder_dir`'s tuned decoder if given): an encoder of the
   bicubic-upsampled LR and fusion blocks into the frozen decoder, trained with MSE on what
   VARSR generates for each training batch (`CFW_DECODING`). Its checkpoint holds the frozen
   decoder; `load_sr` of this run gives the sr run with the CFW decoder (`upscale_image(...,
   cfw_weight=w)`: 0 is the plain decoder, 1 full fusion).
5. `stage="cnn"`: the regression-CNN baseline (`models/srcnn.py`), L1 loss, on the pairs of
   `images.sr_dataset` with HR crops of `crop_size` pixels. It has no quality label, so it trains
   on positive pairs only (`negative_prob` does not apply); with the same seed and crop size, its
   pair i is the sr stage's pair i wherever that one is positive. No VQ-VAE is needed.

Batch i of a run is a pure function of (seed, i) (Grain `MapDataset`s), so a resumed run sees
the batches it would have seen. `upscale_image` runs a trained SR run on an image of any size
(tiled, `varsr.upscale_tiled`); `comparison_image` builds the side-by-side panel.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import OptimConfig
from jaxllm.data import degradations as deg
from jaxllm.data import images
from jaxllm.models import srcnn
from jaxllm.models.var import cfw as cfw_lib
from jaxllm.models.var import refiner as refiner_lib
from jaxllm.models.var import varsr as varsr_lib
from jaxllm.models.var import vqvae as vqvae_lib
from jaxllm.models.var.var import token_accuracy
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.metrics import MetricsWriter
from jaxllm.train.optim import make_optimizer
from jaxllm.train.step import TrainState, make_train_step

STAGES = ("vqvae", "decoder", "sr", "cnn", "cfw")
# How the cfw stage runs its generator on the training batches (and the decoding the CFW is
# fitted to): greedy tokens, the refiner's mean path, no CFG (the page's best decoding).
CFW_DECODING = dict(cfg=None, top_k=1, temperature=0.0)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class SRTrainConfig:
  stage: str = "vqvae"  # STAGES
  workdir: str = "runs/sr"
  vqvae_preset: str = "small"  # vqvae_lib.PRESETS (stage "vqvae")
  varsr_preset: str = "small"  # VARSR_SIZES (stage "sr")
  cnn_preset: str = "small"  # srcnn.PRESETS (stage "cnn")
  vqvae_dir: str | None = None  # stages "sr", "decoder": the run directory of a trained VQ-VAE
  sr_dir: str | None = None  # stage "cfw": the sr-stage run whose outputs it learns to correct
  decoder_dir: str | None = None  # stage "cfw": a decoder-stage run to decode with (optional)
  cfw_init: str | None = None  # stage "cfw": a cfw run of the same sr run to start the fusion
  # from (e.g. an MSE-trained one, fine-tuned here with the adversarial term)
  vqvae_overrides: tuple[str, ...] = ()  # "FIELD=JSON" on the VQ-VAE preset, e.g. "ch=8"
  varsr_overrides: tuple[str, ...] = ()  # "FIELD=JSON" on the VARSR config, e.g. "depth=1"
  cnn_overrides: tuple[str, ...] = ()  # "FIELD=JSON" on the CNN preset, e.g. "num_blocks=4"
  cfw_overrides: tuple[str, ...] = ()  # "FIELD=JSON" on cfw.CFWConfig, e.g. "levels=[1,2]"
  crop_size: int = 64  # stage "cnn": HR crop side (the sr stage uses the VQ-VAE's image_size)
  data: str = "skimage"  # the embedded photos minus the held-out ones, or a folder of images
  scale: int = 4
  degradation: str = "varsr_x4"  # deg.PRESETS; its scale is replaced by `scale`
  negative_prob: float = 0.1  # share of negative-quality (class 1) targets, for image CFG
  steps: int = 1000
  batch_size: int = 8
  lr: float = 1e-3
  warmup_steps: int = 50
  weight_decay: float = 0.05
  clip_norm: float = 2.0
  seed: int = 0
  log_every: int = 50
  save_every: int = 0  # 0: only at the end
  progress: bool = True

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f"stage={self.stage!r}: use one of {STAGES}.")
    if self.stage in ("sr", "decoder") and not self.vqvae_dir:
      raise ValueError(f"the {self.stage} stage needs a trained VQ-VAE: pass --vqvae DIR (a run "
                       "made by `jaxllm sr train --stage vqvae --workdir DIR`).")
    if self.stage == "cfw" and not self.sr_dir:
      raise ValueError("the cfw stage corrects a trained VARSR: pass --sr-run DIR (a run made by "
                       "`jaxllm sr train --stage sr`), and --decoder DIR for a tuned decoder.")
    object.__setattr__(self, "vqvae_overrides", tuple(self.vqvae_overrides))
    object.__setattr__(self, "cfw_overrides", tuple(self.cfw_overrides))
    object.__setattr__(self, "varsr_overrides", tuple(self.varsr_overrides))
    object.__setattr__(self, "cnn_overrides", tuple(self.cnn_overrides))
    if self.scale < 2 or not 0 <= self.negative_prob <= 1 or self.steps < 1:
      raise ValueError("scale must be >= 2, negative_prob in [0, 1] and steps >= 1.")


# VARSR transformer sizes for the sr stage; the rest of its shape comes from the VQ-VAE.
VARSR_SIZES = {
    "tiny": dict(depth=2, d_model=32, num_heads=2, lr_channels=(8, 16, 32, 64),
                 refiner=dict(width=64, depth=2)),
    # refiner no wider than the transformer (VARSR: 1024 vs 1536), so that its 10 sampling
    # steps cost less than a forward pass of the sequence
    "small": dict(depth=4, d_model=128, num_heads=4, lr_channels=(32, 64, 128, 256),
                  refiner=dict(width=128, depth=3)),
    # 3.4x small's FLOPs in the blocks; ~0.6x its training steps per second on 2 CPU cores
    "medium": dict(depth=6, d_model=192, num_heads=6, lr_channels=(32, 64, 128, 256),
                   refiner=dict(width=128, depth=3)),
}


def varsr_config_for(vq: vqvae_lib.VQVAEConfig, scale: int, size: str = "small",
                     **overrides: Any) -> varsr_lib.VARSRConfig:
  """A VARSR config matching a VQ-VAE: same codebook, scales and image size; `size` from
  `VARSR_SIZES`; the LR encoder downsamples by the VQ-VAE's factor."""
  if size not in VARSR_SIZES:
    raise ValueError(f"Unknown VARSR size {size!r}; choose one of {sorted(VARSR_SIZES)}.")
  if vq.image_size % scale:
    raise ValueError(f"the VQ-VAE's {vq.image_size}-pixel images are not divisible by "
                     f"scale={scale}; choose a scale that divides {vq.image_size}.")
  s = dict(VARSR_SIZES[size])
  n_down = int(math.log2(vq.downsample))
  if n_down > len(s["lr_channels"]):
    raise ValueError(f"VARSR size {size!r} supports VQ-VAEs downsampling up to "
                     f"{2 ** len(s['lr_channels'])}x, this one downsamples {vq.downsample}x.")
  width = overrides.get("d_model", s["d_model"])  # the refiner is conditioned on the width
  ref = refiner_lib.RefinerConfig(target_dim=vq.c_vae, cond_dim=width, **s.pop("refiner"))
  s["lr_channels"] = s["lr_channels"][:n_down]
  return varsr_lib.VARSRConfig(**{**s, **dict(
      vocab_size=vq.vocab_size, c_vae=vq.c_vae, patch_nums=vq.patch_nums,
      image_size=vq.image_size, scale=scale, refiner=ref), **overrides})


# ------------------------------------------------------------------------------- configs on disk


def parse_overrides(items, cls) -> dict[str, Any]:
  """["ch=8", "ch_mult=[1,2]", "mid_attn=false"] -> {"ch": 8, ...} (values are JSON; a value
  that is not JSON is kept as a string)."""
  out = {}
  for text in items:
    key, eq, value = text.partition("=")
    if not eq or not key:
      raise ValueError(f"override {text!r} must look like FIELD=VALUE, e.g. ch=8.")
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
      raise ValueError(f"override {text!r}: {cls.__name__} has no field {key!r}; fields: "
                       f"{', '.join(names)}.")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def _varsr_from_dict(d: dict) -> varsr_lib.VARSRConfig:
  d = dict(d)
  if d.get("refiner") is not None:
    d["refiner"] = refiner_lib.RefinerConfig(**d["refiner"])
  return varsr_lib.VARSRConfig(**d)


def read_run(workdir: str | Path) -> dict:
  """The run's config.json, or a FileNotFoundError saying how to make one."""
  path = Path(workdir) / "config.json"
  if not path.is_file() or not (Path(workdir) / "checkpoints").is_dir():
    raise FileNotFoundError(
        f"No SR run at {workdir} (expected {path} and {Path(workdir) / 'checkpoints'}/): train "
        "one with `jaxllm sr train --stage vqvae --workdir DIR`, then `jaxllm sr train --stage "
        "sr --vqvae DIR --workdir SR_DIR`, and pass SR_DIR.")
  run = json.loads(path.read_text())
  if run.get("kind") != "sr":
    raise ValueError(f"{workdir} is not a `jaxllm sr train` run (no \"kind\": \"sr\" in "
                     "config.json).")
  return run


# ------------------------------------------------------------------------------------------ data


def load_photos(data: str) -> list[np.ndarray]:
  """"skimage": the embedded training photos (held-out ones excluded); else every image file in
  the folder `data`, converted to RGB (see `images.to_rgb`)."""
  if data == "skimage":
    return images.train_photos()
  folder = Path(data)
  if not folder.is_dir():
    raise FileNotFoundError(f"--data {data!r} is neither 'skimage' nor a folder of images.")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
  return [images.load_image(p) for p in files]


def hr_crop_dataset(photos, crop: int, seed: int = 0, num_examples: int = 1_000_000):
  """A Grain `MapDataset` of {"image": [crop, crop, 3] in [-1, 1]}: element i a random crop
  (random photo, position, horizontal flip) drawn from np.random.default_rng([seed, i])."""
  import grain
  photos = [images.to_rgb(p) for p in photos]
  small = [i for i, p in enumerate(photos) if min(p.shape[:2]) < crop]
  if small:
    raise ValueError(f"photos {small} are smaller than the {crop}-pixel training crop.")

  def make(i):
    rng = np.random.default_rng([seed, int(i)])
    img = images.random_crop(photos[rng.integers(len(photos))], crop, rng)
    if rng.uniform() < 0.5:
      img = img[:, ::-1]
    return {"image": np.ascontiguousarray(img) * 2 - 1}

  return grain.MapDataset.range(num_examples).map(make)


# -------------------------------------------------------------------------------------- training


def _init_fn(model, example_args, optimizer):
  """`init(seed) -> TrainState`, jittable. Parameters are drawn with the "rbg" PRNG (XLA's
  RngBitGenerator), whose program compiles in a fraction of threefry's time on CPU; the train
  state's own key (dropout, diffusion noise) stays a default-impl key from the same seed."""
  def init(seed):
    params = nn.unbox(model.init(jax.random.key(seed, impl="rbg"), *example_args)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 1)))
  return init


def _varsr_example(c: varsr_lib.VARSRConfig):
  s = c.image_size // c.scale
  return (jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, c.seq_len - c.patch_nums[0] ** 2, c.c_vae)))


def _restore(workdir: Path, abstract):
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    state, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return state


def load_vqvae(workdir: str | Path):
  """(VQVAE module, params) of a finished VQ-VAE-stage run, or of a decoder-stage run (its
  original VQ-VAE with the tuned decoder)."""
  run = read_run(workdir)
  if run["stage"] not in ("vqvae", "decoder"):
    raise ValueError(f"{workdir} is a {run['stage']!r}-stage run; --vqvae needs a run made with "
                     "--stage vqvae (or --stage decoder).")
  model = vqvae_lib.VQVAE(vqvae_lib.VQVAEConfig(**run["vqvae"]))
  if run["stage"] == "vqvae":
    return model, _restore(Path(workdir), _abstract_state(model)).params
  state = _restore(Path(workdir), _decoder_abstract(model))
  return model, {**state["vqvae"], **state["train"].params}


def _decoder_abstract(model: vqvae_lib.VQVAE):
  """Shapes of a decoder-stage checkpoint: {"train": TrainState of the decoder params,
  "vqvae": the original VQ-VAE params}."""
  full = _abstract_state(model).params
  return _finetune_abstract({k: full[k] for k in vqvae_lib.DECODER_PARAMS}, full)


def _finetune_abstract(trained, frozen) -> dict:
  """Shapes of a fine-tuning stage's checkpoint: {"train": TrainState of `trained`, "vqvae":
  `frozen`} (the extra state `train` saves beside it; the schedule does not change shapes)."""
  optimizer = make_optimizer(OptimConfig(schedule="constant"), 1)
  return {"train": jax.eval_shape(_init_from(trained, optimizer), 0), "vqvae": frozen}


def _init_from(params, optimizer):
  """`init(seed) -> TrainState` starting from given params (a fine-tuning stage)."""
  def init(seed):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 1)))
  return init


def _abstract_state(model: nn.Module) -> TrainState:
  """Shapes of a stage's TrainState (the optimizer's schedule does not change them)."""
  optimizer = make_optimizer(OptimConfig(schedule="constant"), 1)
  if isinstance(model, vqvae_lib.VQVAE):
    S = model.config.image_size
    example = (jnp.zeros((1, S, S, 3)),)
  elif isinstance(model, srcnn.SRCNN):  # fully convolutional: any image size gives the shapes
    example = (jnp.zeros((1, 4, 4, 3)),)
  else:
    example = _varsr_example(model.config)
  return jax.eval_shape(_init_fn(model, example, optimizer), 0)


def _stage_setup(cfg: SRTrainConfig):
  """(loss_fn, init_for, dataset, extra state, eval fn, run record) of a stage, where
  `init_for(optimizer)` is the stage's jittable `init(seed) -> TrainState`."""
  photos = load_photos(cfg.data)
  if cfg.stage == "decoder":
    return _decoder_setup(cfg, photos)
  if cfg.stage == "vqvae":
    vq_cfg = vqvae_lib.preset(cfg.vqvae_preset, **parse_overrides(cfg.vqvae_overrides,
                                                                   vqvae_lib.VQVAEConfig))
    model = vqvae_lib.VQVAE(vq_cfg)
    S = vq_cfg.image_size
    data = hr_crop_dataset(photos, S, cfg.seed).batch(cfg.batch_size)
    loss_fn = vqvae_lib.vqvae_loss_fn(model)

    def eval_fn(params, _extra, batch):
      idx = model.apply({"params": params}, batch["image"], method="img_to_idx")
      out = vqvae_lib.codebook_usage(idx, vq_cfg.vocab_size)
      return {k: v for k, v in out.items() if not k.startswith("usage_scale")}

    record = {"vqvae": dataclasses.asdict(vq_cfg)}
    init_for = functools.partial(_init_fn, model, (jnp.zeros((1, S, S, 3)),))
    return loss_fn, init_for, data, None, eval_fn, record
  if cfg.stage == "cnn":
    return _cnn_setup(cfg, photos)
  if cfg.stage == "cfw":
    return _cfw_setup(cfg, photos)
  vq, vq_params = load_vqvae(cfg.vqvae_dir)
  c = varsr_config_for(vq.config, cfg.scale, cfg.varsr_preset,
                       **parse_overrides(cfg.varsr_overrides, varsr_lib.VARSRConfig))
  model = varsr_lib.VARSR(c)
  dcfg = deg.preset(cfg.degradation, scale=cfg.scale)
  data = images.sr_dataset(photos, c.image_size, dcfg, cfg.seed,
                           negative_prob=cfg.negative_prob).batch(cfg.batch_size)
  inner = varsr_lib.varsr_loss_fn(model, vq, vq_params)

  def loss_fn(params, batch, rng):  # the frozen VQ-VAE comes in as a closure constant
    return inner(params, {k: batch[k] for k in ("hr", "lr", "label")}, rng)

  def eval_fn(params, vq_p, batch):
    idx, _, _ = vq.apply({"params": vq_p}, batch["hr"], method="img_to_pyramid")
    x = vq.apply({"params": vq_p}, idx, method="idx_to_var_input")
    logits, _ = model.apply({"params": params}, batch["lr"], batch["label"], x)
    out = vqvae_lib.codebook_usage(idx, c.vocab_size)
    return {"token_acc": token_accuracy(logits, jnp.concatenate(idx, 1)),
            "target_usage": out["usage"]}

  record = {"vqvae": dataclasses.asdict(vq.config), "varsr": dataclasses.asdict(c),
            "vqvae_dir": str(cfg.vqvae_dir)}
  init_for = functools.partial(_init_fn, model, _varsr_example(c))
  return loss_fn, init_for, data, vq_params, eval_fn, record


def _decoder_setup(cfg: SRTrainConfig, photos):
  vq, vq_params = load_vqvae(cfg.vqvae_dir)
  S = vq.config.image_size
  data = hr_crop_dataset(photos, S, cfg.seed).batch(cfg.batch_size)
  start = {k: vq_params[k] for k in vqvae_lib.DECODER_PARAMS}

  def eval_fn(params, original, batch):  # PSNR of the training batch through its tokens
    img = batch["image"]
    out = {}
    for name, p in (("psnr_tokens", {**original, **params}), ("psnr_tokens_start", original)):
      apply = functools.partial(vq.apply, {"params": p})
      out[name] = _batch_psnr(apply(apply(img, method="img_to_idx"), method="idx_to_img"), img)
    return out

  record = {"vqvae": dataclasses.asdict(vq.config), "vqvae_dir": str(cfg.vqvae_dir)}
  return (vqvae_lib.decoder_loss_fn(vq, vq_params), functools.partial(_init_from, start),
          data, vq_params, eval_fn, record)


def _cfw_setup(cfg: SRTrainConfig, photos):
  base = load_sr(cfg.sr_dir, decoder=cfg.decoder_dir)
  if not isinstance(base, SRModel) or base.cfw is not None:
    kind = "cnn" if isinstance(base, CNNModel) else "cfw"
    raise ValueError(f"--sr-run {cfg.sr_dir} is a {kind}-stage run; the cfw stage needs an "
                     "sr-stage run (VARSR).")
  model = cfw_lib.CFWDecoder(base.vqvae.config, cfw_lib.CFWConfig(
      **parse_overrides(cfg.cfw_overrides, cfw_lib.CFWConfig)))
  trained, frozen = cfw_lib.split(cfw_lib.init_params(model, base.vq_params, cfg.seed))
  digest = _generator_digest(base)
  if cfg.cfw_init:
    trained = _cfw_start(cfg.cfw_init, trained, digest, base)
  data = images.sr_dataset(photos, base.config.image_size,
                           deg.preset(cfg.degradation, scale=cfg.scale), cfg.seed
                           ).batch(cfg.batch_size)

  def generate(lr, rng):
    return varsr_lib.upscale(base.model, base.params, base.vqvae, base.vq_params, lr, rng,
                             **CFW_DECODING)["f_hat"]

  def eval_fn(params, frozen_params, batch):  # PSNR on the training batch, fused and not
    f_hat = generate(batch["lr"], jax.random.key(0))
    apply = functools.partial(model.apply, {"params": cfw_lib.decoder_params(
        {**frozen_params, **params})})
    return {"psnr_cfw": _batch_psnr(apply(f_hat, batch["lr"], 1.0), batch["hr"]),
            "psnr_plain": _batch_psnr(apply(f_hat, batch["lr"], 0.0), batch["hr"])}

  record = {"vqvae": dataclasses.asdict(base.vqvae.config),
            "cfw": dataclasses.asdict(model.cfw), "sr_dir": str(cfg.sr_dir),
            "decoder_dir": cfg.decoder_dir, "generator_digest": digest,
            "cfw_decoding": CFW_DECODING}
  return (cfw_lib.cfw_loss_fn(model, frozen, generate), functools.partial(_init_from, trained),
          data, frozen, eval_fn, record)


def _cfw_start(init_dir: str, trained: dict, digest: str, base: SRModel) -> dict:
  """`trained` with its LR encoder and fusions taken from the cfw run `init_dir`, which must
  correct the same generator (`base`, whose digest is `digest`) with the same fusion shapes (its
  discriminator, if any, is not taken)."""
  run = read_run(init_dir)
  if run["stage"] != "cfw":
    raise ValueError(f"--cfw-init {init_dir} is not a cfw-stage run.")
  if run["generator_digest"] != digest:
    raise ValueError(f"--cfw-init {init_dir} was trained on another sr run or decoder; start "
                     "from a cfw run of this one.")
  take, _ = cfw_lib.split(_restore_cfw(Path(init_dir), run, base)[1])
  mine = cfw_lib.decoder_params(trained)
  if jax.tree.structure(take) != jax.tree.structure(mine) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(take), jax.tree.leaves(mine))):
    raise ValueError(f"--cfw-init {init_dir} fuses other levels or block counts than "
                     "--cfw-set asks for; use the same levels and blocks.")
  return {**trained, **take}


def _generator_digest(m: SRModel) -> str:
  """SHA-256 of a VARSR's and its VQ-VAE's parameters: a cfw run is tied to its generator."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves((m.params, m.vq_params)):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def _batch_psnr(x, y):
  """PSNR of images in [-1, 1] (x clipped), over the whole batch."""
  return 10 * jnp.log10(4.0 / jnp.mean((jnp.clip(x, -1, 1) - y) ** 2))


def _cnn_setup(cfg: SRTrainConfig, photos):
  c = srcnn.preset(cfg.cnn_preset, **{"scale": cfg.scale,
                                      **parse_overrides(cfg.cnn_overrides, srcnn.SRCNNConfig)})
  model = srcnn.SRCNN(c)
  dcfg = deg.preset(cfg.degradation, scale=cfg.scale)
  data = images.sr_dataset(photos, cfg.crop_size, dcfg, cfg.seed).batch(cfg.batch_size)

  def eval_fn(params, _extra, batch):
    sr = model.apply({"params": params}, batch["lr"])
    return {"psnr": _batch_psnr(sr, batch["hr"]),
            "psnr_bicubic": _batch_psnr(srcnn.bicubic_upsample(batch["lr"], c.scale), batch["hr"])}

  s = cfg.crop_size // cfg.scale
  init_for = functools.partial(_init_fn, model, (jnp.zeros((1, s, s, 3)),))
  return (srcnn.l1_loss_fn(model), init_for, data, None, eval_fn,
          {"cnn": dataclasses.asdict(c)})


def train(cfg: SRTrainConfig) -> dict[str, Any]:
  """Trains (or resumes) one stage; returns {"state", "extra", "metrics" (last logged)}."""
  workdir = Path(cfg.workdir)
  loss_fn, init_for, data, extra, eval_fn, record = _stage_setup(cfg)
  ocfg = OptimConfig(lr=cfg.lr, schedule="warmup_cosine", warmup_steps=cfg.warmup_steps,
                     weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
  optimizer = make_optimizer(ocfg, cfg.steps)
  init = init_for(optimizer)
  run = {"kind": "sr", "stage": cfg.stage, "train": dataclasses.asdict(cfg), **record}
  cfg_path = workdir / "config.json"
  if cfg_path.is_file():
    old = json.loads(cfg_path.read_text())
    if old.get("stage") != cfg.stage or old.get("vqvae") != json.loads(
        json.dumps(run.get("vqvae"))):
      raise FileExistsError(f"{workdir} holds a different run ({old.get('stage')!r} stage); "
                            "choose a new --workdir.")
  workdir.mkdir(parents=True, exist_ok=True)
  cfg_path.write_text(json.dumps(run, indent=2))
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  wrap = (lambda st: st) if extra is None else (lambda st: {"train": st, "vqvae": extra})
  if ckpt.latest_step() is not None:
    abstract = jax.eval_shape(lambda k: wrap(init(k)), 0)
    restored, _ = ckpt.restore(abstract)
    state = restored if extra is None else restored["train"]
  else:
    state = jax.jit(init)(cfg.seed)
  step_fn = jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=(0,))
  eval_jit = jax.jit(eval_fn)
  writer = MetricsWriter(workdir)
  start = int(state.step)
  bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc=f"sr {cfg.stage}",
             unit="step", dynamic_ncols=True)
  last: dict[str, float] = {}
  t0 = time.perf_counter()
  try:
    for step in range(start + 1, cfg.steps + 1):
      batch = {k: jnp.asarray(v) for k, v in data[step - 1].items()}
      state, metrics = step_fn(state, batch)
      if step % cfg.log_every == 0 or step == cfg.steps:
        last = {k: float(v) for k, v in metrics.items() if k != "tokens"}
        if not math.isfinite(last["loss"]):
          raise FloatingPointError(f"loss is {last['loss']} at step {step}; lower --lr.")
        last.update({k: float(v) for k, v in eval_jit(state.params, extra, batch).items()})
        last["steps_per_s"] = (step - start) / (time.perf_counter() - t0)
        writer.write(step, "train", last)
        bar.set_postfix({k: f"{v:.3g}" for k, v in last.items()
                         if k in ("loss", "usage", "perplexity", "token_acc")})
      if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
        ckpt.save(step, wrap(state), meta={"step": step})
      bar.update(1)
    bar.close()
    if ckpt.latest_step() != int(state.step):
      ckpt.save(int(state.step), wrap(state), meta={"step": int(state.step)})
    ckpt.wait()
  finally:
    ckpt.close()
    writer.close()
  return {"state": state, "extra": extra, "metrics": last}


def train_step_flops(cfg: SRTrainConfig) -> float:
  """FLOPs of one optimizer step of a stage at `cfg.batch_size`: XLA's cost analysis of the
  lowered train step (the frozen VQ-VAE's tokenisation included for the sr stage)."""
  loss_fn, init_for, data, _, _, _ = _stage_setup(cfg)
  optimizer = make_optimizer(OptimConfig(lr=cfg.lr, schedule="constant"), cfg.steps)
  state = jax.eval_shape(init_for(optimizer), 0)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in data[0].items()}
  return float(jax.jit(make_train_step(loss_fn, optimizer)).lower(state, batch)
               .cost_analysis()["flops"])


# ------------------------------------------------------------------------------------- inference


@dataclasses.dataclass(frozen=True)
class SRModel:
  model: varsr_lib.VARSR
  params: Any
  vqvae: vqvae_lib.VQVAE
  vq_params: Any
  run: dict  # config.json of the run
  cfw: tuple[cfw_lib.CFWDecoder, Any] | None = None  # a cfw-stage run's decoder and params

  @property
  def config(self) -> varsr_lib.VARSRConfig:
    return self.model.config

  @property
  def tile(self) -> int:
    """LR tile side the model takes."""
    return self.config.image_size // self.config.scale


@dataclasses.dataclass(frozen=True)
class CNNModel:
  """A trained cnn-stage run: the regression baseline (any input size, no sampling options)."""

  model: srcnn.SRCNN
  params: Any
  run: dict

  @property
  def config(self) -> srcnn.SRCNNConfig:
    return self.model.config


def load_sr(workdir: str | Path, decoder: str | Path | None = None) -> SRModel | CNNModel:
  """A trained sr-stage run (VARSR and its frozen VQ-VAE), or a cnn-stage run, from its
  directory. `decoder`: a decoder-stage run tuned from the VQ-VAE this sr run was trained on,
  whose decoder replaces the checkpoint's (the tokens are the same; checked). A cfw-stage run
  loads as its sr run with the CFW decoder attached (`SRModel.cfw`)."""
  run = read_run(workdir)
  if run["stage"] == "cfw":
    return _load_cfw(Path(workdir), run, decoder)
  if run["stage"] == "cnn":
    if decoder is not None:
      raise ValueError("--decoder is for VARSR runs; this is a cnn-stage run: drop --decoder.")
    model = srcnn.SRCNN(srcnn.SRCNNConfig(**run["cnn"]))
    return CNNModel(model, _restore(Path(workdir), _abstract_state(model)).params, run)
  if run["stage"] != "sr":
    raise ValueError(f"{workdir} is a {run['stage']}-stage run; upscaling needs the sr stage "
                     f"trained on a VQ-VAE: `jaxllm sr train --stage sr --vqvae VQ_DIR "
                     f"--workdir SR_DIR`.")
  vq = vqvae_lib.VQVAE(vqvae_lib.VQVAEConfig(**run["vqvae"]))
  model = varsr_lib.VARSR(_varsr_from_dict(run["varsr"]))
  abstract = {"train": _abstract_state(model), "vqvae": _abstract_state(vq).params}
  state = _restore(Path(workdir), abstract)
  vq_params = state["vqvae"]
  if decoder is not None:
    vq_params = _swap_decoder(vq_params, run, decoder)
    run = {**run, "decoder_dir": str(decoder)}
  return SRModel(model, state["train"].params, vq, vq_params, run)


def _load_cfw(workdir: Path, run: dict, decoder) -> SRModel:
  """A cfw-stage run: its sr run (reloaded from the recorded directory, checked bit-for-bit by
  digest) with the CFW decoder attached."""
  if decoder is not None:
    raise ValueError("a cfw-stage run decodes with its own (frozen) decoder: drop --decoder.")
  base_dir = Path(run["sr_dir"])
  if not (base_dir / "config.json").is_file():
    raise FileNotFoundError(f"{workdir} corrects the sr run {base_dir}, which is not there any "
                            "more; restore it (the CFW stores only its own parameters).")
  base = load_sr(base_dir, decoder=run["decoder_dir"])
  if _generator_digest(base) != run["generator_digest"]:
    raise ValueError(f"the sr run {base_dir} (decoder {run['decoder_dir']}) has changed since "
                     f"{workdir} was trained on its outputs; retrain the cfw stage.")
  return dataclasses.replace(base, run={**base.run, "cfw_dir": str(workdir), "cfw_run": run},
                             cfw=_restore_cfw(workdir, run, base))


def _restore_cfw(workdir: Path, run: dict, base: SRModel):
  """(CFWDecoder, its params without the discriminator) of the cfw run `workdir` (config `run`)
  trained on the generator `base`."""
  model = cfw_lib.CFWDecoder(base.vqvae.config, cfw_lib.CFWConfig(**run["cfw"]))
  trained, frozen = jax.eval_shape(
      lambda: cfw_lib.split(cfw_lib.init_params(model, base.vq_params)))
  state = _restore(workdir, _finetune_abstract(trained, frozen))
  return model, cfw_lib.decoder_params({**state["vqvae"], **state["train"].params})


def _swap_decoder(vq_params, run: dict, decoder: str | Path):
  """`vq_params` with the decoder of the decoder-stage run `decoder`, after checking that the
  run's tokenizer (everything but the decoder) is bit-for-bit the one in `vq_params`."""
  d_run = read_run(decoder)
  if d_run["stage"] != "decoder":
    raise ValueError(f"--decoder {decoder} is a {d_run['stage']}-stage run; it needs a run made "
                     f"with `jaxllm sr train --stage decoder --vqvae VQ_DIR`.")
  if d_run["vqvae"] != run["vqvae"]:
    raise ValueError(f"--decoder {decoder} tunes a VQ-VAE of another shape than this sr run's.")
  _, tuned = load_vqvae(decoder)
  for k in vq_params:
    if k in vqvae_lib.DECODER_PARAMS:
      continue
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        vq_params[k], tuned[k])
    if not all(jax.tree.leaves(same)):
      raise ValueError(f"--decoder {decoder} was tuned from VQ-VAE {d_run['vqvae_dir']}, whose "
                       f"{k!r} parameters differ from those this sr run was trained on "
                       f"({run.get('vqvae_dir')}): its tokens would not be the ones the "
                       "transformer predicts. Tune a decoder of that VQ-VAE instead.")
  return {**vq_params, **{k: tuned[k] for k in vqvae_lib.DECODER_PARAMS}}


def check_input(sr: SRModel | CNNModel, lr: np.ndarray, scale: int) -> None:
  """Raises a ValueError naming the fix for a scale or an image size the model cannot take."""
  c = sr.config
  if scale != c.scale:
    raise ValueError(f"this checkpoint was trained for x{c.scale} only, not x{scale}: use "
                     f"--scale {c.scale}, or train an sr-stage run with --scale {scale}.")
  if isinstance(sr, CNNModel):
    return  # fully convolutional: any size
  need = max(sr.tile // 2, 1)
  if min(lr.shape[:2]) < need:
    raise ValueError(f"input is {lr.shape[0]}x{lr.shape[1]} pixels; this model needs at least "
                     f"{need} pixels per side (half its {sr.tile}-pixel LR tile; smaller sides "
                     f"are mirror-padded up to the tile). Use a larger image or enlarge it first.")


def upscale_image(sr: SRModel | CNNModel, lr: np.ndarray, scale: int, *, seed: int = 0,
                  cfg: float | None = None, top_k: int = 1, top_p: float = 0.75,
                  temperature: float = 1.0, refine: bool = True,
                  refiner_steps: int | None = None, overlap: int | None = None,
                  batch: int = 4, self_ensemble: bool = False,
                  color_fix: str = "adain", mbr_tokens: bool = False,
                  cfw_weight: float | None = None) -> np.ndarray:
  """LR image [h, w, 3] in [0, 1] (any size >= half a tile) -> SR [h s, w s, 3] in [0, 1].

  cfg=None: positive quality label only; a number: image-based CFG against the negative label,
  which needs a model trained with negative_prob > 0. `temperature` scales the refiner's
  sampling noise (0: the mean path of its sampler; VARSR samples at 1) and, when top_k > 1, the
  token logits. `self_ensemble`: the mean over the 8 flips / rotations of the input
  (`images.self_ensemble`, EDSR's "+" models; 8x the time, and for VARSR an average of samples:
  higher PSNR, blurrier). `color_fix` (VARSR only): "adain" matches each tile's channel means
  and stds to its bicubic LR (VARSR's), "wavelet" puts the whole image's detail bands on the
  bicubic LR's low-frequency residual (`varsr.wavelet_color_fix`), "none" keeps the decoder's
  colours. `mbr_tokens`: each scale's tokens are the codes nearest the expected code vector
  under the model's distribution (`varsr.mbr_tokens_from_logits`) instead of draws.
  `cfw_weight` (a cfw-stage run only; default 1): StableSR's fidelity weight w in [0, 1], 0 the
  plain decoder, 1 the LR fully fused in. A `CNNModel`
  runs on the whole image at once; the sampling and colour options do not apply to it, and a
  cfg raises."""
  if color_fix not in COLOR_FIXES:
    raise ValueError(f"color_fix={color_fix!r}: choose one of {COLOR_FIXES}.")
  if cfw_weight is not None and cfw_weight < 0:
    raise ValueError(f"cfw_weight={cfw_weight} must be >= 0 (0: the plain decoder, 1: the "
                     "weight the CFW was trained at).")
  if cfw_weight is not None and getattr(sr, "cfw", None) is None:
    raise ValueError("cfw_weight is for cfw-stage runs (`jaxllm sr train --stage cfw`); this "
                     "checkpoint has no CFW: drop --cfw-weight or pass a cfw run.")
  lr = images.to_rgb(lr)
  check_input(sr, lr, scale)
  if isinstance(sr, CNNModel):
    if cfg is not None:
      raise ValueError("--cfg is for VARSR runs; this is a cnn-stage run (a regression CNN with "
                       "no quality label): drop --cfg.")
    def run(x):
      return (np.asarray(_cnn_apply(sr.model, sr.params, jnp.asarray(x)[None] * 2 - 1)[0]) + 1) / 2
  else:
    if cfg is not None and not sr.run["train"].get("negative_prob", 0):
      raise ValueError("this checkpoint never saw negative-quality (class 1) examples, so image "
                       "CFG has nothing to guide against: drop --cfg, or retrain the sr stage "
                       "with --negative-prob 0.1.")
    refine = refine and sr.config.refiner is not None
    cfw = None if sr.cfw is None else (*sr.cfw, 1.0 if cfw_weight is None else cfw_weight)
    fn = varsr_lib.make_upscaler(sr.model, sr.params, sr.vqvae, sr.vq_params, seed=seed, cfw=cfw,
                                 cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                 refine=refine, refiner_steps=refiner_steps if refine else None,
                                 color_fix=color_fix == "adain", mbr_tokens=mbr_tokens)
    overlap = max(sr.tile // 8, 1) if overlap is None else overlap

    def run(x):
      out = varsr_lib.upscale_tiled(fn, x, sr.tile, scale, overlap=overlap, batch=batch)
      if color_fix == "wavelet":
        out = _wavelet_fix(jnp.asarray(out)[None],
                           jnp.asarray(bicubic_upscale(x, scale))[None])[0]
      return np.asarray(out)
  out = images.self_ensemble(run, lr) if self_ensemble else run(lr)
  return np.clip(out, 0, 1)


COLOR_FIXES = ("adain", "wavelet", "none")
_wavelet_fix = jax.jit(varsr_lib.wavelet_color_fix)


@functools.partial(jax.jit, static_argnums=0)
def _cnn_apply(model: srcnn.SRCNN, params, lr_BhwC):
  return model.apply({"params": params}, lr_BhwC)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
  h, w = lr.shape[:2]
  return np.clip(images.resize(images.to_rgb(lr), (h * scale, w * scale), "bicubic"), 0, 1)


def comparison_image(lr: np.ndarray, sr: np.ndarray | dict[str, np.ndarray], scale: int,
                     hr: np.ndarray | None = None) -> np.ndarray:
  """Side-by-side uint8 panel [LR (nearest), bicubic, ours, HR if given] with a label above each
  (all at the SR size). `sr` is one image (labelled "VARSR") or {label: image}, in order."""
  from PIL import Image, ImageDraw
  lr = images.to_rgb(lr)
  outputs = dict(sr) if isinstance(sr, dict) else {"VARSR": sr}
  panels = [("LR (nearest)", np.repeat(np.repeat(lr, scale, 0), scale, 1)),
            ("bicubic", bicubic_upscale(lr, scale)), *outputs.items()]
  if hr is not None:
    panels.append(("HR", images.to_rgb(hr)))
  H, W = next(iter(outputs.values())).shape[:2]
  label_h, gap = 14, 4
  canvas = Image.new("RGB", (len(panels) * (W + gap) - gap, H + label_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (name, img) in enumerate(panels):
    if img.shape[:2] != (H, W):
      raise ValueError(f"the {name} panel is {img.shape[0]}x{img.shape[1]}, expected {H}x{W}.")
    canvas.paste(Image.fromarray(images.to_uint8(img)), (i * (W + gap), label_h))
    draw.text((i * (W + gap) + 2, 1), name, fill="black")
  return np.asarray(canvas)
