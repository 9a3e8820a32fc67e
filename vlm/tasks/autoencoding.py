"""Video autoencoding: a causal 3D VAE (vlm/models/video_vae.py) trained to reconstruct clips.

Per example (uint8 video [T, H, W, 3] → x in [-1, 1], reconstruction x̂ from z ~ q(z | x)):

    loss = l1_weight · mean|x̂ − x| + l2_weight · mean(x̂ − x)² + kl_weight · KL(q ‖ N(0, I)) / (T·H·W·3)

the means over the clip's pixel values, the KL summed over its latent values and divided by the
same count (so kl_weight means what it means in LDM / Wan, where both terms are sums). No
perceptual (LPIPS) or adversarial term: they need a pretrained network or a discriminator vlm does
not have yet; configs must leave `perceptual_weight` and `adversarial_weight` at 0.

Evaluators: `loss` (cheap: the held-out loss terms over a few batches) and `reconstruction`
(PSNR and SSIM per frame over the held-out clips, posterior mean, chunked decode like `vlm
reconstruct`; input | reconstruction side by side as W/samples/<step>/reconstructions.{mp4,gif}).
Also here: `vlm reconstruct` (`reconstruct_file`) and the loaded-VAE encoder of `vlm data encode`.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vlm import sharding
from vlm.errors import ConfigError
from vlm.eval import image_quality, video_files
from vlm.eval import loop as eval_loop
from vlm.models import video_vae_tiling
from vlm.models.video_vae import VideoVAE, normalize_video, to_uint8

# config.model.vae keys passed to VideoVAE (vlm/models/video_vae.py VARIANTS).
VAE_KEYS = ("base_channels", "channel_multipliers", "num_res_blocks", "latent_channels", "temporal_downsample",
            "mid_attention", "resample_shortcut", "patch_size", "norm", "init_logvar")
WEIGHTS = ("l1_weight", "l2_weight", "kl_weight")
NOT_IMPLEMENTED = ("perceptual_weight", "adversarial_weight")


def vae_options(model_config) -> dict:
    """VideoVAE keyword arguments from config.model (tuples where the constructor wants sequences)."""
    vae = model_config.vae
    opts = {k: (tuple(vae[k]) if isinstance(vae[k], (list, tuple)) else vae[k]) for k in VAE_KEYS if k in vae}
    return dict(opts, remat=model_config.remat, dtype=jnp.dtype(model_config.dtype))


def compression(model_config) -> tuple[int, int]:
    """(spatial, temporal) compression of the configured VAE, without building it."""
    vae = model_config.vae
    spatial = int(vae.get("patch_size", 1)) * 2 ** (len(vae.channel_multipliers) - 1)
    return spatial, 2 ** sum(bool(t) for t in vae.temporal_downsample)


def per_example_terms(model: VideoVAE, video: jax.Array, rng: jax.Array | None) -> dict[str, jax.Array]:
    """{"l1", "l2", "kl"}: each [B] float32 (means over the clip's values; KL per value); z sampled with rng."""
    recon, posterior = model(video, rng)  # [B, T, H, W, 3] float32, [-1, 1] scale
    target = normalize_video(video)
    diff = recon - target
    values = np.prod(video.shape[1:])
    return {
        "l1": jnp.abs(diff).reshape(diff.shape[0], -1).mean(-1),
        "l2": jnp.square(diff).reshape(diff.shape[0], -1).mean(-1),
        "kl": posterior.kl() / values,
    }


def param_hash(params) -> str:
    """sha256 (hex) of a parameter tree's float32 values and their '/'-joined paths, in path order."""
    digest = hashlib.sha256()
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(flat):
        value = np.ascontiguousarray(np.asarray(jax.device_get(flat[name]), np.float32))
        digest.update(name.encode() + str(value.shape).encode() + value.tobytes())
    return digest.hexdigest()


class Task:
    per_example_loss = True  # a mean of per-example terms: plain gradient accumulation

    def __init__(self, config):
        self.config = config
        self.task_config = config.task
        self.validate()

    def validate(self) -> None:
        """Checks of this task's keys; one line each, before anything compiles."""
        c, t = self.config, self.config.task
        for key in WEIGHTS:
            if not float(t[key]) >= 0:
                raise ConfigError(f"config.task.{key}={t[key]} must be ≥ 0")
        for key in NOT_IMPLEMENTED:
            if float(t.get(key, 0.0)) != 0:
                raise ConfigError(f"config.task.{key}={t[key]}: perceptual and adversarial losses are not implemented "
                                  f"in vlm yet; set it to 0")
        unknown = sorted(set(c.model.vae) - set(VAE_KEYS))
        if unknown:
            raise ConfigError(f"config.model.vae has unknown key(s) {', '.join(unknown)}; its keys: {', '.join(VAE_KEYS)}")
        try:
            spatial, temporal = compression(c.model)
            nnx.eval_shape(lambda: VideoVAE(**vae_options(c.model), rngs=nnx.Rngs(0)))  # the model's own checks
        except ValueError as e:
            raise ConfigError(f"config.model.vae: {e}") from None
        if (c.data.num_frames - 1) % temporal:
            raise ConfigError(f"config.data.num_frames={c.data.num_frames}: the VAE compresses time {temporal}x "
                              f"causally and needs 1 + {temporal}k frames (e.g. {1 + temporal}, {1 + 2 * temporal}, "
                              f"{1 + 4 * temporal})")
        if c.data.resolution % spatial:
            raise ConfigError(f"config.data.resolution={c.data.resolution} is not divisible by the VAE's spatial "
                              f"compression {spatial}")

    def build_model(self, rngs: nnx.Rngs) -> VideoVAE:
        return VideoVAE(**vae_options(self.config.model), rngs=rngs)

    def features(self, model: VideoVAE, batch, rng) -> dict[str, jax.Array]:
        rng = rng if self.task_config.sample_posterior else None
        return per_example_terms(model, batch["video"], rng)  # each [B]

    @property
    def loss_weights(self) -> tuple[float, float, float]:
        """(l1, l2, kl) weights of the per-example loss."""
        t = self.task_config
        return float(t.l1_weight), float(t.l2_weight), float(t.kl_weight)

    def combine(self, terms: dict[str, jax.Array]) -> jax.Array:
        """The weighted per-example loss [B]."""
        return combine_terms(terms, self.loss_weights)

    def loss(self, model: VideoVAE, features, batch):
        del model, batch
        terms = {k: sharding.constrain(v, ("batch",)) for k, v in features.items()}
        l2 = terms["l2"].mean()
        metrics = {f"train/{k}": v.mean() for k, v in terms.items()}
        metrics["train/psnr"] = 10.0 * jnp.log10(4.0 / jnp.maximum(l2, 1e-10))  # of the batch MSE on [-1, 1]
        return self.combine(terms).mean(), metrics

    # ----- evaluation on the held-out split -----

    def evaluators(self):
        return {"loss": self.heldout_loss, "reconstruction": self.reconstruction}

    def heldout_loss(self, model: VideoVAE, *, mesh, step: int, workdir: str | None, num_batches: int = 2
                     ) -> dict[str, float]:
        """The loss terms on the first `num_batches` held-out batches (0 = all), z = the posterior mean."""
        graphdef, state = nnx.split(model)
        out, _ = eval_loop.eval_outputs(functools.partial(_heldout_terms, graphdef, state, weights=self.loss_weights),
                                        self.config.data,
                                        global_batch_size=self.config.eval_batch_size, mesh=mesh, host_keys=(),
                                        max_batches=num_batches or None)
        return {k: float(v.mean()) for k, v in out.items()}

    def reconstruction(self, model: VideoVAE, *, mesh, step: int, workdir: str | None, num_batches: int = 0,
                       num_samples: int = 4, chunk: int = 1) -> dict[str, float]:
        """PSNR and SSIM (per frame, on uint8 pixels, mean over frames and clips) of the held-out clips,
        encoded to the posterior mean and decoded `chunk` latent frames at a time; samples in W/samples/<step>/."""
        graphdef, state = nnx.split(model)
        n = max(0, min(num_samples, self.config.eval_batch_size))
        samples = []

        def fn(batch):
            metrics, first = _reconstruct(graphdef, state, batch, num_samples=n, chunk=chunk,
                                          replicated=sharding.replicated(mesh))
            if not samples:
                samples.append(jax.device_get(first))
            return metrics

        out, _ = eval_loop.eval_outputs(fn, self.config.data, global_batch_size=self.config.eval_batch_size,
                                        mesh=mesh, host_keys=(), max_batches=num_batches or None)
        if workdir and n and samples and jax.process_index() == 0:
            folder = epath.Path(workdir) / "samples" / str(step)
            folder.mkdir(parents=True, exist_ok=True)
            clips = side_by_side(samples[0]["video"], samples[0]["recon"])
            video_files.write(folder / "reconstructions.mp4", clips, scale=4)
            video_files.write(folder / "reconstructions.gif", clips, scale=2)
        return {k: float(v.mean()) for k, v in out.items()}


def combine_terms(terms: dict[str, jax.Array], weights: tuple[float, float, float]) -> jax.Array:
    """The weighted per-example loss [B] of the terms {"l1", "l2", "kl"} [B]."""
    l1_weight, l2_weight, kl_weight = weights
    return l1_weight * terms["l1"] + l2_weight * terms["l2"] + kl_weight * terms["kl"]


# The jitted evaluation steps are module functions, not closures made per eval: every eval of a run reuses one
# compiled program (graphdef and options static, equal from eval to eval; weights as arguments), and the jit
# cache holds no task.
@functools.partial(jax.jit, static_argnames=("graphdef", "weights"))
def _heldout_terms(graphdef, state, batch, *, weights: tuple[float, float, float]):
    out = per_example_terms(nnx.merge(graphdef, state), batch["video"], None)
    return {**out, "loss": combine_terms(out, weights)}


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "chunk", "replicated"))
def _reconstruct(graphdef, state, batch, *, num_samples: int, chunk: int, replicated):
    """({"psnr", "ssim"} [B] (means over frames), the first `num_samples` clips and their reconstructions, on every
    process) of a batch encoded to the posterior mean and decoded `chunk` latent frames at a time."""
    vae = nnx.merge(graphdef, state)
    video = batch["video"]
    recon = to_uint8(video_vae_tiling.decode_chunked(vae, vae.encode(video).mean, chunk))
    metrics = {"psnr": image_quality.psnr(recon, video).mean(-1), "ssim": image_quality.ssim(recon, video).mean(-1)}
    first = {"video": video[:num_samples], "recon": recon[:num_samples]}
    return metrics, jax.lax.with_sharding_constraint(first, replicated)


# ----- sample videos -----

def side_by_side(inputs: np.ndarray, recons: np.ndarray, gap: int = 2) -> np.ndarray:
    """uint8 [N, T, H, W, 3] twice → one clip [T, N·(H+gap), 2W+gap, 3]: a row per clip, input | reconstruction."""
    n, t, h, w, _ = inputs.shape
    out = np.full((t, n * (h + gap), 2 * w + gap, 3), 128, np.uint8)
    for i in range(n):
        top = i * (h + gap)
        out[:, top:top + h, :w] = inputs[i]
        out[:, top:top + h, w + gap:] = recons[i]
    return out


# ----- a trained VAE, outside training -----

def load_vae(workdir: str, *, step: int | None = None) -> tuple[VideoVAE, object, int, str]:
    """(vae, config, step, parameter hash) of a `vlm train` run of this task: EMA weights when kept, one device."""
    from vlm import train

    config = train.load_config(workdir)
    if config.task.name != "autoencoding":
        raise ConfigError(f"{workdir} is a {config.task.name!r} run, not a video autoencoder (task autoencoding)")
    vae, config, step = train.load_model(workdir, step=step)
    return vae, config, step, param_hash(nnx.to_pure_dict(nnx.state(vae, nnx.Param)))


def encoder_fn(vae: VideoVAE, devices=None, chunk: int = 1):
    """A function uint8 video [b, T, H, W, 3] (numpy) → (posterior mean, std) float32 [b, t, h, w, z] (numpy):
    the chunked encode, data parallel over `devices` (default: this process's), b a multiple of their number."""
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    graphdef, state = nnx.split(vae)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    @functools.partial(jax.jit, in_shardings=(None, rows), out_shardings=(rows, rows))
    def encode(state, video):
        posterior = video_vae_tiling.encode_chunked(nnx.merge(graphdef, state), video, chunk)
        return posterior.mean, posterior.std

    def run(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(video) % len(devices):
            raise ValueError(f"encode batch of {len(video)} clips does not divide over {len(devices)} devices")
        mean, std = encode(state, jax.device_put(video, rows))
        return np.asarray(mean, np.float32), np.asarray(std, np.float32)

    return run


def read_video_file(path: str, *, num_frames: int = 0, resolution: int = 0, spatial: int = 8,
                    temporal: int = 4) -> tuple[np.ndarray, float]:
    """(uint8 [T, H, W, 3], fps) of a video file: its first `num_frames` frames (0 = as many as there are),
    cut to 1 + temporal·k; shorter side resized to `resolution` and centre-cropped square (0 = native
    size, centre-cropped to multiples of `spatial`)."""
    from input_pipeline import video as video_lib

    data = epath.Path(path).read_bytes()
    info = video_lib.probe(data)
    available = max(int(info.num_frames), 1)
    count = min(num_frames, available) if num_frames else available
    count = 1 + (count - 1) // temporal * temporal
    if num_frames and count != num_frames:
        raise ValueError(f"--num_frames={num_frames}: the video has {available} frames and the VAE needs 1 + "
                         f"{temporal}k; pass one of those ≤ {available}")
    fps = float(info.fps or 8.0)
    times = (np.arange(count) + 0.5) / fps
    frames = video_lib.decode_frames(data, times, resolution or None)
    h, w = frames.shape[1] // spatial * spatial, frames.shape[2] // spatial * spatial
    if not h or not w:
        raise ValueError(f"{path}: frames of {frames.shape[1]}x{frames.shape[2]} are smaller than the VAE's "
                         f"{spatial}x{spatial} latent pixel")
    top, left = (frames.shape[1] - h) // 2, (frames.shape[2] - w) // 2
    return np.ascontiguousarray(frames[:, top:top + h, left:left + w]), fps


def reconstruct_file(workdir: str, in_path: str, out_path: str, *, num_frames: int = 0, resolution: int = 0,
                     chunk: int = 1) -> dict:
    """`vlm reconstruct`: a video file through the run's VAE (chunked encode and decode, posterior mean).

    Writes the reconstruction to `out_path` (mp4, or gif by suffix) and returns {"psnr", "ssim" (means
    over frames), "frames", "height", "width", "step", "out"}.
    """
    vae, _, step, _ = load_vae(workdir)
    video, fps = read_video_file(in_path, num_frames=num_frames, resolution=resolution,
                                 spatial=vae.spatial_compression, temporal=vae.temporal_compression)
    graphdef, state = nnx.split(vae)

    @jax.jit
    def roundtrip(state, video):
        m = nnx.merge(graphdef, state)
        z = video_vae_tiling.encode_chunked(m, video, chunk).mean
        return to_uint8(video_vae_tiling.decode_chunked(m, z, chunk))

    recon = np.asarray(roundtrip(state, jnp.asarray(video[None])))[0]  # uint8 [T, H, W, 3]
    video_files.write(out_path, recon, fps=fps)
    t, h, w, _ = video.shape
    return {"psnr": float(image_quality.psnr(recon, video).mean()), "ssim": float(image_quality.ssim(recon, video).mean()),
            "frames": t, "height": h, "width": w, "step": step, "out": str(out_path)}


def encode_dataset(vae_workdir: str, data_config, out_name: str, *, data_dir: str = "", splits=(),
                   max_examples: int = 0, stored: str = "posterior", chunk_size: int = 256, batch_size: int = 0,
                   seed: int = 0, step: int | None = None, overwrite: bool = False, log=print) -> dict | None:
    """`vlm data encode`: the clips of `data_config`'s splits (default: its train and eval splits, at most
    `max_examples` each) encoded by the VAE run `vae_workdir` into the latent dataset `out_name` in
    `data_dir` (default: the data config's). Every process encodes its chunks on its local devices, then
    process 0 writes the dataset (input_pipeline/builders/latent_captions.py). Returns the latent info
    on process 0, None elsewhere. Re-running the same command resumes after an interruption."""
    from input_pipeline import datasets
    from input_pipeline.builders import latent_captions

    vae, _, vae_step, digest = load_vae(vae_workdir, step=step)
    t, r = data_config.num_frames, data_config.resolution
    shape = vae.latent_shape((1, t, r, r, 3))[1:]  # a one-line ValueError for a clip the VAE cannot take
    splits = list(splits) or list(dict.fromkeys([data_config.get("train_split", "train"),
                                                 datasets.eval_split(data_config)]))
    for split in splits:
        if "[" in split or "+" in split:
            raise ValueError(f"--splits: {split!r}; name whole splits (train, validation, ...), not slices")
        datasets.check_split(data_config.name, data_config.data_dir, split, "--splits")
    counts = {s: len(latent_captions.ClipSource(data_config, s, max_examples)) for s in splits}
    source = {k: data_config.get(k) for k in ("name", "data_dir", "num_frames", "resolution", "sampling",
                                                 "max_objects", "short_clips") if k in data_config}
    plan = latent_captions.Plan(
        out_name=out_name, data_dir=data_dir or data_config.data_dir, splits=counts, shape=tuple(shape),
        stored=stored, chunk_size=chunk_size, seed=seed, stats_split=splits[0],
        vae={"hash": digest, "step": int(vae_step), "workdir": str(vae_workdir)}, source=source)
    latent_captions.check_writable(plan, overwrite)
    devices = jax.local_devices()
    batch_size = batch_size or 8 * len(devices)
    batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the local devices
    log(f"encoding {', '.join(f'{s}: {n} clips' for s, n in counts.items())} of {data_config.name} with the VAE "
        f"at step {vae_step} (hash {digest[:12]}) → latents {list(shape)}; work folder {plan.work_dir(splits[0]).parent}")
    latent_captions.encode_chunks(plan, data_config, encoder_fn(vae, devices), process_index=jax.process_index(),
                                  process_count=jax.process_count(), batch_size=batch_size, log=log)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("vlm data encode: every chunk written")
    info = latent_captions.write_dataset(plan, overwrite=overwrite) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vlm data encode: dataset written")
    return info
