"""Super-resolution end to end through the CLI: `jaxllm sr train` (both stages) and
`jaxllm sr upscale`, on a folder of two 32-pixel crops of the embedded photos.

The tiny VQ-VAE and VARSR overfit the two crops (teacher-forced token accuracy ~100%), after which
upscaling a degraded LR of each crop must beat bicubic upsampling of the same LR in PSNR, with the
PSNR computed independently here (scikit-image's `peak_signal_noise_ratio` on the Y channel).
The regression-CNN baseline (`--stage cnn`) trained on the same crops must beat bicubic the same
way. The decoder and cfw stages are checked against the sr run they decode for. Then the bad
inputs: a scale the checkpoint was not trained for, an image below the minimum
size, a missing run, a run of the wrong stage, a bad ablation value, CFG asked of the CNN, and
grayscale / RGBA files (converted, with a note).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from jaxllm import cli
from jaxllm.data import degradations as deg
from jaxllm.data import images
from jaxllm.eval.sr_metrics import rgb_to_y
from jaxllm.models.var import varsr as varsr_lib

STEPS = 600  # both stages; ~25 s each on 2 cores
CNN_STEPS = 200  # the CNN baseline
COMMON = ["--steps", str(STEPS), "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "10",
          "--log-every", "100", "--no-progress"]


def _y(img):
  """Y channel without the usual `scale`-pixel border (as SR papers and `sr_metrics` crop)."""
  return rgb_to_y(img)[4:-4, 4:-4]


def _last_json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
  """{"root": a scratch folder, "data": its folder of two 32-pixel crops of the photos}."""
  root = tmp_path_factory.mktemp("sr")
  data = root / "crops"
  data.mkdir()
  rng = np.random.default_rng(0)
  photos = images.train_photos()
  for i in (0, 1):
    images.save_image(data / f"crop{i}.png", images.random_crop(photos[i], 32, rng))
  return {"root": root, "data": data}


@pytest.fixture(scope="module")
def runs(crops):
  root, data = crops["root"], crops["data"]
  vq, srd = root / "vq", root / "sr"
  assert cli.main(["sr", "train", "--stage", "vqvae", "--workdir", str(vq), "--vqvae-preset",
                   "tiny", "--data", str(data), *COMMON]) == 0
  assert cli.main(["sr", "train", "--stage", "sr", "--vqvae", str(vq), "--workdir", str(srd),
                   "--varsr-preset", "tiny", "--data", str(data), *COMMON]) == 0
  return {"root": root, "data": data, "vq": vq, "sr": srd}


@pytest.fixture(scope="module")
def cnn_run(crops):
  """The CNN baseline on the same two crops (32-pixel HR crops, the same degradation)."""
  cnn = crops["root"] / "cnn"
  common = ["--steps", str(CNN_STEPS), *COMMON[2:]]
  assert cli.main(["sr", "train", "--stage", "cnn", "--workdir", str(cnn), "--cnn-preset", "tiny",
                   "--crop-size", "32", "--data", str(crops["data"]), *common]) == 0
  return cnn


def _upscale_beats_bicubic(crops, ckpt, capsys, tag):
  """Upscales a fresh degradation of each training crop with `ckpt` through the CLI; checks the
  output beats bicubic by 0.5 dB (scikit-image PSNR) and that the CLI's metrics agree."""
  for i in range(2):
    hr, lr = deg.degrade(images.load_image(crops["data"] / f"crop{i}.png"), 100 + i,
                         deg.varsr_x4())
    lr_path, out_path = crops["root"] / f"lr{i}.png", crops["root"] / f"{tag}{i}.png"
    hr_path, cmp_path = crops["root"] / f"hr{i}.png", crops["root"] / f"{tag}_cmp{i}.png"
    images.save_image(lr_path, lr)  # LR is on 8-bit levels: the PNG round trip is exact
    images.save_image(hr_path, hr)
    assert cli.main(["sr", "upscale", str(lr_path), str(out_path), "--scale", "4", "--ckpt",
                     str(ckpt), "--hr", str(hr_path), "--compare", str(cmp_path)]) == 0
    result = _last_json(capsys)
    out = images.load_image(out_path)
    assert out.shape == (32, 32, 3) and result["size"] == [32, 32]
    assert images.load_image(cmp_path).shape[1] == 4 * 32 + 3 * 4  # LR | bicubic | ours | HR
    bicubic_img = images.resize(lr, (32, 32), "bicubic").clip(0, 1)
    ours, bicubic = (peak_signal_noise_ratio(_y(hr), _y(x), data_range=255)
                     for x in (out, bicubic_img))
    assert ours > bicubic + 0.5, (i, ours, bicubic)
    # the CLI's own metrics agree with scikit-image's (to the PNG's 8-bit rounding)
    assert result["ours"]["psnr"] == pytest.approx(ours, abs=0.05)
    assert result["bicubic"]["psnr"] == pytest.approx(bicubic, abs=0.05)
    assert set(result["ours"]) >= {"psnr", "ssim"}


def test_tiny_varsr_overfits_crops_and_beats_bicubic(runs, capsys):
  capsys.readouterr()
  metrics = [json.loads(line) for line in (runs["sr"] / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["step"] == STEPS
  assert metrics[-1]["token_acc"] >= 0.98, metrics[-1]
  _upscale_beats_bicubic(runs, runs["sr"], capsys, "sr")


def test_cnn_baseline_fits_crops_and_beats_bicubic(crops, cnn_run, capsys):
  capsys.readouterr()
  metrics = [json.loads(line) for line in (cnn_run / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["step"] == CNN_STEPS
  # it starts as bicubic (zero last conv) and ends clearly above it on its training batches
  assert metrics[-1]["psnr"] > metrics[-1]["psnr_bicubic"] + 1.0, metrics[-1]
  _upscale_beats_bicubic(crops, cnn_run, capsys, "cnn")
  lr = images.load_image(crops["root"] / "lr0.png")
  assert cli.main(["sr", "upscale", str(crops["root"] / "lr0.png"), str(crops["root"] / "c.png"),
                   "--scale", "4", "--ckpt", str(cnn_run), "--cfg", "2"]) == 2
  assert "--cfg is for VARSR runs" in capsys.readouterr().err
  # --self-ensemble: the mean over the 8 symmetries; a CNN trained on two crops is not
  # equivariant, so it moves the output, but only a little (it is an average of near-copies)
  assert cli.main(["sr", "upscale", str(crops["root"] / "lr0.png"), str(crops["root"] / "s.png"),
                   "--scale", "4", "--ckpt", str(cnn_run), "--self-ensemble"]) == 0
  plain, ens = (images.load_image(crops["root"] / f) for f in ("cnn0.png", "s.png"))
  assert ens.shape == plain.shape and 0 < np.abs(ens - plain).mean() < 0.05
  # fully convolutional: an LR of any size, here 5 x 7, comes out 20 x 28
  images.save_image(crops["root"] / "odd.png", lr[:5, :7])
  assert cli.main(["sr", "upscale", str(crops["root"] / "odd.png"), str(crops["root"] / "o.png"),
                   "--scale", "4", "--ckpt", str(cnn_run)]) == 0
  assert images.load_image(crops["root"] / "o.png").shape == (20, 28, 3)


def test_decoder_stage_keeps_the_tokens_and_decodes_for_the_sr_run(runs, capsys):
  """`--stage decoder` tunes only the decoder (every other parameter bit-for-bit kept, so the
  tokens are the sr run's), lowers the reconstruction error through the tokens, and
  `upscale --decoder` decodes the sr run's predictions with it."""
  from jaxllm.models.var import vqvae as vqm
  from jaxllm.train import sr
  dec = runs["root"] / "dec"
  assert cli.main(["sr", "train", "--stage", "decoder", "--vqvae", str(runs["vq"]), "--workdir",
                   str(dec), "--data", str(runs["data"]), "--steps", "100", "--batch-size", "4",
                   "--lr", "1e-3", "--warmup-steps", "10", "--log-every", "50",
                   "--no-progress"]) == 0
  vq, orig = sr.load_vqvae(runs["vq"])
  _, tuned = sr.load_vqvae(dec)
  for k in orig:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(orig[k]),
                                                     jax.tree.leaves(tuned[k])))
    assert same == (k not in vqm.DECODER_PARAMS), k
  img = jnp.asarray(np.stack([images.load_image(runs["data"] / f"crop{i}.png")
                              for i in (0, 1)]) * 2 - 1)
  idx = {n: vq.apply({"params": p}, img, method="img_to_idx")
         for n, p in (("orig", orig), ("tuned", tuned))}
  for a, b in zip(idx["orig"], idx["tuned"]):
    np.testing.assert_array_equal(a, b)
  mse = {n: float(jnp.mean((vq.apply({"params": p}, idx[n], method="idx_to_img") - img) ** 2))
         for n, p in (("orig", orig), ("tuned", tuned))}
  assert mse["tuned"] < 0.9 * mse["orig"], mse
  # the sr run with the tuned decoder: same transformer, decoder swapped
  model = sr.load_sr(runs["sr"], decoder=dec)
  assert model.run["decoder_dir"] == str(dec)
  for k in orig:
    src = tuned if k in vqm.DECODER_PARAMS else orig
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model.vq_params[k]),
                                                     jax.tree.leaves(src[k])))
  _, lr = deg.degrade(images.load_image(runs["data"] / "crop0.png"), 100, deg.varsr_x4())
  images.save_image(runs["root"] / "dlr.png", lr)  # on 8-bit levels: the round trip is exact
  outs = [sr.upscale_image(m, lr, 4, temperature=0.0) for m in (sr.load_sr(runs["sr"]), model)]
  assert np.abs(outs[0] - outs[1]).max() > 1e-3
  capsys.readouterr()
  assert cli.main(["sr", "upscale", str(runs["root"] / "dlr.png"), str(runs["root"] / "d.png"),
                   "--scale", "4", "--ckpt", str(runs["sr"]), "--decoder", str(dec),
                   "--temperature", "0"]) == 0
  np.testing.assert_allclose(images.load_image(runs["root"] / "d.png"), outs[1], atol=1 / 255)
  # --color-fix wavelet: the uncorrected output's detail on the bicubic LR's low bands
  plain = sr.upscale_image(model, lr, 4, temperature=0.0, color_fix="none")
  want = varsr_lib.wavelet_color_fix(jnp.asarray(plain)[None],
                                     jnp.asarray(sr.bicubic_upscale(lr, 4))[None])[0]
  assert cli.main(["sr", "upscale", str(runs["root"] / "dlr.png"), str(runs["root"] / "w.png"),
                   "--scale", "4", "--ckpt", str(runs["sr"]), "--decoder", str(dec),
                   "--temperature", "0", "--color-fix", "wavelet"]) == 0
  np.testing.assert_allclose(images.load_image(runs["root"] / "w.png"),
                             np.clip(np.asarray(want), 0, 1), atol=1 / 255)
  assert np.abs(plain - outs[1]).max() > 1e-3  # AdaIN did change the colours
  # --mbr-tokens reaches the sampler (what it emits is tested in test_var.py)
  mbr = sr.upscale_image(model, lr, 4, mbr_tokens=True, refine=False)
  assert cli.main(["sr", "upscale", str(runs["root"] / "dlr.png"), str(runs["root"] / "m.png"),
                   "--scale", "4", "--ckpt", str(runs["sr"]), "--decoder", str(dec),
                   "--mbr-tokens", "--no-refine"]) == 0
  np.testing.assert_allclose(images.load_image(runs["root"] / "m.png"), mbr, atol=1 / 255)
  with pytest.raises(ValueError, match="choose one of"):
    sr.upscale_image(model, lr, 4, color_fix="wavelets")
  # a decoder tuned from another tokenizer (here: the encoder moved) would mis-decode: refused
  moved = {**model.vq_params, "encoder": jax.tree.map(lambda x: x + 1e-3,
                                                      model.vq_params["encoder"])}
  with pytest.raises(ValueError, match="'encoder' parameters differ"):
    sr._swap_decoder(moved, model.run, dec)
  for argv, message in [
      (["--decoder", str(runs["vq"])], "is a vqvae-stage run"),
      (["--temperature", "-1"], "must be >= 0")]:
    assert cli.main(["sr", "upscale", str(runs["root"] / "dlr.png"),
                     str(runs["root"] / "e.png"), "--scale", "4", "--ckpt", str(runs["sr"]),
                     *argv]) == 2
    assert message in capsys.readouterr().err, argv
  assert not (runs["root"] / "e.png").exists()


def test_cfw_stage_fuses_the_lr_and_weight_zero_is_the_sr_run(runs, capsys):
  """`--stage cfw` trains StableSR's fusion into the frozen decoder on what the sr run generates:
  its fused decode beats the plain one on the training batches; its checkpoint holds the sr run's
  decoder bit-for-bit; `upscale --cfw-weight 0` reproduces the sr run exactly, weight 1 moves
  it; and the wrong uses get clear errors."""
  from jaxllm.models.var import vqvae as vqm
  from jaxllm.train import sr
  cfw_dir = runs["root"] / "cfw"
  assert cli.main(["sr", "train", "--stage", "cfw", "--sr-run", str(runs["sr"]), "--workdir",
                   str(cfw_dir), "--data", str(runs["data"]), "--steps", "60", "--batch-size",
                   "4", "--lr", "1e-3", "--warmup-steps", "5", "--log-every", "30",
                   "--no-progress"]) == 0
  metrics = [json.loads(line) for line in (cfw_dir / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["step"] == 60
  assert metrics[-1]["psnr_cfw"] > metrics[-1]["psnr_plain"] + 0.3, metrics[-1]
  base, fused = sr.load_sr(runs["sr"]), sr.load_sr(cfw_dir)
  for k in vqm.DECODER_PARAMS:
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base.vq_params[k]),
                                                     jax.tree.leaves(fused.cfw[1][k])))
  _, lr = deg.degrade(images.load_image(runs["data"] / "crop1.png"), 100, deg.varsr_x4())
  images.save_image(runs["root"] / "clr.png", lr)
  plain = sr.upscale_image(base, lr, 4, temperature=0.0)
  np.testing.assert_allclose(sr.upscale_image(fused, lr, 4, temperature=0.0, cfw_weight=0.0),
                             plain, atol=1e-6)
  full = sr.upscale_image(fused, lr, 4, temperature=0.0)  # default weight 1
  assert np.abs(full - plain).max() > 1e-3
  capsys.readouterr()
  assert cli.main(["sr", "upscale", str(runs["root"] / "clr.png"), str(runs["root"] / "c.png"),
                   "--scale", "4", "--ckpt", str(cfw_dir), "--temperature", "0"]) == 0
  np.testing.assert_allclose(images.load_image(runs["root"] / "c.png"), full, atol=1 / 255)
  for ckpt, argv, message in [
      (runs["sr"], ["--cfw-weight", "0.5"], "cfw_weight is for cfw-stage runs"),
      (cfw_dir, ["--cfw-weight", "-1"], "must be >= 0"),
      (cfw_dir, ["--decoder", str(runs["vq"])], "decodes with its own"),
  ]:
    assert cli.main(["sr", "upscale", str(runs["root"] / "clr.png"), str(runs["root"] / "e.png"),
                     "--scale", "4", "--ckpt", str(ckpt), *argv]) == 2
    assert message in capsys.readouterr().err, argv
  assert cli.main(["sr", "train", "--stage", "cfw", "--workdir", str(runs["root"] / "x"),
                   "--data", str(runs["data"])]) == 2
  assert "pass --sr-run DIR" in capsys.readouterr().err
  # StableSR's adversarial term, fine-tuning this run: the discriminator is trained beside the
  # fusions and left out of the model that upscales; w 0 is still the sr run
  adv_dir = runs["root"] / "cfw_adv"
  tune = ["--workdir", str(adv_dir), "--data", str(runs["data"]), "--steps", "10",
          "--batch-size", "4", "--lr", "1e-4", "--warmup-steps", "2", "--no-progress"]
  assert cli.main(["sr", "train", "--stage", "cfw", "--sr-run", str(runs["sr"]), "--cfw-init",
                   str(cfw_dir), "--cfw-set", "adv_weight=0.2", *tune]) == 0
  tuned = sr.load_sr(adv_dir)
  assert "disc" not in tuned.cfw[1] and tuned.run["cfw_run"]["cfw"]["adv_weight"] == 0.2
  np.testing.assert_allclose(sr.upscale_image(tuned, lr, 4, temperature=0.0, cfw_weight=0.0),
                             plain, atol=1e-6)
  for argv, message in [(["--cfw-init", str(runs["sr"])], "not a cfw-stage run"),
                        (["--cfw-init", str(cfw_dir), "--cfw-set", "levels=[0]"],
                         "fuses other levels")]:
    tune[1] = str(runs["root"] / "cfw_bad")
    assert cli.main(["sr", "train", "--stage", "cfw", "--sr-run", str(runs["sr"]), *argv,
                     *tune]) == 2
    assert message in capsys.readouterr().err, argv
  # a cfw run is tied to the generator it was trained on: a changed sr run is refused
  record = json.loads((cfw_dir / "config.json").read_text())
  (cfw_dir / "config.json").write_text(json.dumps({**record, "generator_digest": "0" * 64}))
  try:
    with pytest.raises(ValueError, match="has changed since"):
      sr.load_sr(cfw_dir)
  finally:
    (cfw_dir / "config.json").write_text(json.dumps(record))


def test_upscale_bad_input_gets_a_clear_error(runs, capsys, tmp_path):
  lr = np.random.default_rng(0).uniform(size=(8, 8, 3)).astype(np.float32)
  images.save_image(tmp_path / "lr.png", lr)
  images.save_image(tmp_path / "tiny.png", lr[:3, :3])
  up = ["sr", "upscale", str(tmp_path / "lr.png"), str(tmp_path / "out.png")]
  capsys.readouterr()
  cases = [
      (up + ["--scale", "2", "--ckpt", str(runs["sr"])], "trained for x4 only"),
      (["sr", "upscale", str(tmp_path / "tiny.png"), str(tmp_path / "out.png"), "--scale", "4",
        "--ckpt", str(runs["sr"])], "needs at least 4 pixels per side"),
      (up + ["--scale", "4", "--ckpt", str(tmp_path / "nope")], "No SR run at"),
      (up + ["--scale", "4", "--ckpt", str(runs["vq"])], "is a vqvae-stage run"),
      (["sr", "upscale", str(tmp_path / "missing.png"), str(tmp_path / "out.png"), "--scale",
        "4", "--ckpt", str(runs["sr"])], "does not exist"),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2, argv
    assert message in capsys.readouterr().err, argv
  assert not (tmp_path / "out.png").exists()  # nothing written on failure


def test_train_bad_input_gets_a_clear_error(runs, capsys, tmp_path):
  capsys.readouterr()
  base = ["sr", "train", "--steps", "1", "--no-progress", "--data", str(runs["data"])]
  cases = [
      (base + ["--stage", "sr", "--workdir", str(tmp_path / "a")], "needs a trained VQ-VAE"),
      (base + ["--stage", "sr", "--vqvae", str(runs["sr"]), "--workdir", str(tmp_path / "b")],
       "needs a run made with --stage vqvae"),
      (base + ["--stage", "sr", "--vqvae", str(runs["vq"]), "--workdir", str(runs["vq"]),
               "--varsr-preset", "tiny"], "holds a different run"),
      (base + ["--stage", "vqvae", "--workdir", str(tmp_path / "c"), "--vqvae-preset", "tiny",
               "--vqvae-set", "chh=8"], "has no field 'chh'"),
      (base + ["--stage", "sr", "--vqvae", str(runs["vq"]), "--workdir", str(tmp_path / "d"),
               "--scale", "3"], "not divisible by scale=3"),
      (base + ["--stage", "sr", "--vqvae", str(runs["vq"]), "--workdir", str(tmp_path / "f"),
               "--varsr-preset", "tiny", "--varsr-set", "conditioning=cross"],
       "VARSRConfig.conditioning='cross'"),
      (base + ["--stage", "cnn", "--workdir", str(tmp_path / "g"), "--scale", "3"],
       "power of two"),
      (["sr", "train", "--stage", "vqvae", "--workdir", str(tmp_path / "e"), "--data",
        str(tmp_path / "no_such_folder")], "neither 'skimage' nor a folder"),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2, argv
    assert message in capsys.readouterr().err, argv


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_are_converted_with_a_note(runs, capsys, tmp_path, mode):
  from PIL import Image
  rng = np.random.default_rng(1)
  channels = {"L": 1, "RGBA": 4}[mode]
  arr = rng.integers(0, 256, (8, 8, channels), dtype=np.uint8)
  path = tmp_path / f"in_{mode}.png"
  Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
  capsys.readouterr()
  assert cli.main(["sr", "upscale", str(path), str(tmp_path / "out.png"), "--scale", "4",
                   "--ckpt", str(runs["sr"]), "--no-refine"]) == 0
  captured = capsys.readouterr()
  assert f"is {mode}, not RGB" in captured.err
  assert images.load_image(tmp_path / "out.png").shape == (32, 32, 3)
  if mode == "L":  # grey in, grey tiles: the replicated channels give the same input as RGB
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.repeat(arr, 3, -1), "RGB").save(rgb)
    assert cli.main(["sr", "upscale", str(rgb), str(tmp_path / "out_rgb.png"), "--scale", "4",
                     "--ckpt", str(runs["sr"]), "--no-refine"]) == 0
    np.testing.assert_array_equal(images.load_image(tmp_path / "out_rgb.png"),
                                  images.load_image(tmp_path / "out.png"))
