"""Video autoencoding task: PSNR/SSIM against hand-computed values, the sharded train step equals one
device, a tiny run's evaluators and samples, `vlm reconstruct` on a PyAV-written mp4, config errors."""

import math

import av
import jax
import numpy as np
import pytest
from flax import nnx

from configs import video_vae
from tests.helpers import jax_traces, read_metrics, run_vlm
from vlm import sharding, train
from vlm.errors import ConfigError
from vlm.eval import evaluators, image_quality, video_files
from vlm.tasks import autoencoding

# A VAE with few layers, so that its train step compiles in seconds: a 4x4 patchify stem and one 2x
# down/upsampling stage (8x space, 2x time), no res blocks but the middle ones.
# norm and init_logvar set here (not inherited from VARIANTS["tiny"]), so this fixture does not drift with
# the tiny variant's tuning.
SMALL_VAE = dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=0, latent_channels=4,
                 temporal_downsample=(True,), mid_attention=False, resample_shortcut=True, patch_size=4,
                 norm="rms", init_logvar=0.0)
SMALL = dict(batch_size=8, eval_batch_size=8, total_steps=2, log_every=1)
SMALL_DATA = dict(num_frames=5, resolution=16, eval_size=8, max_text_len=8)


def small_vae_config(**mesh):
    c = video_vae.get_config("tiny")
    c.model.vae.update(SMALL_VAE)
    c.update(SMALL)
    c.optim.update(dict(warmup_steps=0, lr=1e-3))
    c.data.update(SMALL_DATA)
    if mesh:
        c.mesh.update(mesh)
    return c


def overrides(config_dict: dict, prefix: str = "--config") -> list[str]:
    """--config.a.b=value flags for a nested dict of settings."""
    flags = []
    for key, value in config_dict.items():
        if isinstance(value, dict):
            flags += overrides(value, f"{prefix}.{key}")
        else:
            text = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")" \
                if isinstance(value, tuple) else str(value)
            flags.append(f"{prefix}.{key}={text}")
    return flags


# ----- PSNR and SSIM ---------------------------------------------------------------------------------

def test_psnr_hand_values():
    black = np.zeros((2, 3, 16, 16, 3), np.uint8)
    # Every pixel off by 10: MSE = 100, PSNR = 10 log10(255² / 100) = 28.1308 dB.
    np.testing.assert_allclose(image_quality.psnr(black, black + 10), 10 * math.log10(255**2 / 100), rtol=1e-6)
    assert image_quality.psnr(black, black + 10).shape == (2, 3)  # one value per frame
    # Half the pixels off by 2 (MSE 2) on a [0, 1] scale of 1/255 steps: the same dB as on [0, 255].
    half = black.astype(np.float32).copy()
    half[..., :8, :] = 2.0
    np.testing.assert_allclose(image_quality.psnr(half / 255, black / 255.0, data_range=1.0),
                               10 * math.log10(255**2 / 2), rtol=1e-5)
    assert float(image_quality.psnr(black, black).max()) == image_quality.PSNR_MAX_DB  # exact: capped


def test_ssim_hand_values():
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    frame = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.float32)
    np.testing.assert_allclose(image_quality.ssim(frame, frame), 1.0, rtol=1e-6)
    # Flat frames 100 and 50: no variance, only the luminance term (2·100·50 + C1) / (100² + 50² + C1).
    flat = lambda v: np.full((16, 16, 3), v, np.float32)
    np.testing.assert_allclose(image_quality.ssim(flat(100), flat(50)), (2 * 100 * 50 + c1) / (100**2 + 50**2 + c1),
                               rtol=1e-5)
    # A frame against its negative around its mean: luminance 1 per window where the means match; structure
    # (−2σ² + C2) / (2σ² + C2) < 0. Checked against a direct window-by-window computation (float64).
    other = np.random.default_rng(1).integers(0, 256, (20, 24, 3)).astype(np.float32)
    g = image_quality.gaussian_window()
    window = np.outer(g, g).astype(np.float64)
    expected = []
    for ch in range(3):
        for i in range(20 - 10):
            for j in range(24 - 10):
                a, b = frame[i:i + 11, j:j + 11, ch].astype(np.float64), other[i:i + 11, j:j + 11, ch]
                ma, mb = (window * a).sum(), (window * b).sum()
                va, vb = (window * a * a).sum() - ma**2, (window * b * b).sum() - mb**2
                cov = (window * a * b).sum() - ma * mb
                expected.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    np.testing.assert_allclose(image_quality.ssim(frame, other), np.mean(expected), rtol=1e-4, atol=1e-5)
    noisy = np.clip(frame + np.random.default_rng(2).normal(0, 20, frame.shape), 0, 255)
    assert 0.5 < float(image_quality.ssim(frame, noisy)) < 0.99  # noise lowers it, but not to nothing
    with pytest.raises(ValueError, match="at least 11x11"):
        image_quality.ssim(frame[:8], frame[:8])


# ----- the task --------------------------------------------------------------------------------------

def test_config_errors():
    c = small_vae_config()
    c.data.num_frames = 6
    with pytest.raises(ConfigError, match="needs 1 \\+ 2k frames"):
        autoencoding.Task(c)
    c = small_vae_config()
    c.data.resolution = 20
    with pytest.raises(ConfigError, match="not divisible by the VAE's spatial compression 8"):
        autoencoding.Task(c)
    c = small_vae_config()
    c.task.perceptual_weight = 0.1
    with pytest.raises(ConfigError, match="not implemented"):
        autoencoding.Task(c)
    c = small_vae_config()
    c.model.vae.patch_size = 2  # 4x space now
    assert autoencoding.compression(c.model) == (4, 2)
    assert autoencoding.compression(video_vae.get_config("wan").model) == (8, 4)
    with pytest.raises(ValueError, match="unknown variant"):
        video_vae.get_config("huge")


def one_step(config, devices):
    """(metrics, params) after init + one train step on a mesh over `devices`, on the host."""
    mesh = sharding.create_mesh(config.mesh, devices)
    setup = train.build(config, mesh)
    rng = np.random.default_rng(0)
    d = config.data
    batch = {"video": rng.integers(0, 256, (config.batch_size, d.num_frames, d.resolution, d.resolution, 3), np.uint8),
             "tokens": np.ones((config.batch_size, d.max_text_len), np.int32)}
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init.lower().compile()()
        init = jax.device_get(state["params"])
        batch = sharding.global_batch(batch, mesh)
        state, metrics = setup.train_step.lower(state, batch).compile()(state, batch)
    return jax.device_get(metrics), jax.device_get(state["params"]), init


def test_sharded_train_step_equals_one_device():
    """8 devices: batch over data x fsdp = 4, conv kernels' output channels over tensor = 2."""
    reference, ref_params, init = one_step(small_vae_config(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    config = small_vae_config(data=2, fsdp=2, tensor=2)
    config.sharding_rules = [["batch", ["data", "fsdp"]], ["frames", None], ["conv_in", None], ["conv_out", "tensor"]]
    metrics, params, _ = one_step(config, jax.devices())
    for key in ("train/loss", "train/l2", "train/kl", "train/grad_norm"):
        np.testing.assert_allclose(metrics[key], reference[key], rtol=1e-5, err_msg=key)
    assert metrics["train/kl"] > 0 and metrics["train/psnr"] < 20  # a real (sampled, untrained) step
    moved = 0.0
    for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), jax.tree.leaves(init)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # Adam's first step ≈ lr·sign(g)
        moved = max(moved, float(np.abs(a - c).max()))
    assert moved > 1e-4


_RUN = {}


def tiny_vae_run(tmp_path_factory):
    """`vlm train` of the small VAE for 2 steps with both evaluators (one process, one device), shared by
    this file and test_latent_cache.py: (workdir, data_dir). EMA on: evaluation and loading use it."""
    if "run" not in _RUN:
        tmp = tmp_path_factory.mktemp("vae_run")
        settings = dict(SMALL, eval_every=2, checkpoint_every=2, ema=dict(decay=0.5),
                        model=dict(vae=SMALL_VAE), optim=dict(warmup_steps=0),
                        data=dict(SMALL_DATA, data_dir=str(tmp / "data")))
        workdir = tmp / "w"
        proc = run_vlm("train", "--config=configs/video_vae.py:tiny", f"--workdir={workdir}", *overrides(settings))
        assert proc.returncode == 0, proc.stderr[-3000:]
        _RUN["run"] = workdir, str(tmp / "data")
    return _RUN["run"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    return tiny_vae_run(tmp_path_factory)


def test_run_logs_losses_and_evaluates_psnr_ssim_with_samples(vae_run):
    workdir, _ = vae_run
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:  # loss = l2 + 1e-6·kl (l1 weight 0)
        assert r["train/loss"] == pytest.approx(r["train/l2"] + 1e-6 * r["train/kl"], rel=1e-5)
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    assert {"eval/psnr", "eval/ssim", "eval/loss", "eval/l1", "eval/l2", "eval/kl"} <= set(evals)
    assert 3 < evals["eval/psnr"] < 30 and -1 < evals["eval/ssim"] < 1
    # The held-out MSE (posterior mean, unquantised) and PSNR (uint8) tell the same story within rounding.
    assert evals["eval/psnr"] == pytest.approx(10 * math.log10(4 / evals["eval/l2"]), abs=1.0)
    folder = workdir / "samples" / "2"
    for name in ("reconstructions.mp4", "reconstructions.gif"):
        with av.open(str(folder / name)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        # 5 frames; 4 clips of 16 px in rows of input | reconstruction (2 px gaps), scaled 4x / 2x.
        scale = 4 if name.endswith("mp4") else 2
        assert len(frames) == 5 and frames[0].shape == (scale * 4 * 18, scale * 34, 3)


def test_evaluators_compile_once_and_repeat_the_runs_numbers(vae_run, tmp_path):
    """Both evaluators in this process with one task, as the train loop calls them: the run's step-2 numbers
    (EMA weights, one device), the samples written, and nothing traced or compiled on the second eval."""
    workdir, _ = vae_run
    config = train.load_config(str(workdir))
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    setup, model, step = train.restore_params(config, str(workdir), mesh)
    chosen = evaluators.from_config(config, setup.task)
    logged = {k: v for r in read_metrics(workdir) if r["step"] == 2 for k, v in r.items() if k.startswith("eval/")}
    with sharding.use_mesh(mesh, setup.rules), jax_traces() as traced:
        first = evaluators.run(chosen, model, mesh=mesh, step=step, workdir=str(tmp_path))
        assert traced
        del traced[:]
        again = evaluators.run(chosen, nnx.merge(*nnx.split(model)), mesh=mesh, step=step, workdir=None)
    assert traced == [] and again == first
    assert first.keys() == logged.keys()
    for key in logged:
        assert first[key] == pytest.approx(logged[key], rel=1e-5), key
    assert (tmp_path / "samples" / str(step) / "reconstructions.mp4").exists()


def test_vlm_reconstruct_prints_psnr_ssim_and_writes_the_video(vae_run, tmp_path):
    workdir, _ = vae_run
    source = tmp_path / "in.mp4"
    rng = np.random.default_rng(0)
    frames = np.zeros((11, 24, 40, 3), np.uint8) + 30
    for t in range(11):  # a square moving right: something to reconstruct
        frames[t, 6:18, 2 + 2 * t:14 + 2 * t] = (200, 60, 30)
    frames = np.clip(frames + rng.integers(0, 8, frames.shape), 0, 255).astype(np.uint8)
    video_files.write(str(source), frames, fps=10)
    out = tmp_path / "out.mp4"
    proc = run_vlm("reconstruct", f"--workdir={workdir}", str(source), f"--out={out}", "--num_frames=9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("PSNR ") and "SSIM" in line and "9 frames of 24x40" in line and str(out) in line
    psnr, ssim = float(line.split()[1]), float(line.split()[4])
    assert 3 < psnr < 40 and -1 < ssim < 1
    with av.open(str(out)) as container:
        written = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(written) == 9 and written[0].shape == (24, 40, 3)
    bad = run_vlm("reconstruct", f"--workdir={workdir}", str(source), f"--out={out}", "--num_frames=8")
    assert bad.returncode == 2 and "1 + 2k" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
