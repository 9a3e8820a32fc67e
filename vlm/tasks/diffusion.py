"""Text-to-video diffusion: a DiT on cached, normalised video latents, trained by rectified flow.

    x0 = (latents − mean_c) / std_c           per-channel statistics stored with the latent cache
    t ~ logit-normal(mean, std), shifted       s = task.shift, or sqrt(tokens / base_tokens) when 0
    x_t = (1 − t)·x0 + t·ε;  loss_i = w(t_i)·mean((v_θ(x_t, t, text_i) − (ε − x0))²)
    text_i replaced by the learned null text with probability p_uncond (classifier-free guidance)

The loss is a mean of per-example terms with per-example weights (finite at batch size 1; never
normalised over the sampled batch), so microbatching is plain accumulation. The EMA of the
trainer (`config.ema.decay`) is what evaluation and `vlm sample` use.

Evaluators:
  fm_loss     held-out flow-matching loss at fixed t ∈ {0.1, …, 0.9} and fixed noise: cheap, often.
  generation  samples from held-out prompts (Euler/Heun, CFG, jitted), decoded by the VAE run
              `model.vae_workdir`, scored by the dual-encoder run `scorer_workdir`: gen_t2v_r1,
              gen_fd, gen_attr_<attribute>; grids in W/samples/<step>/.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vlm import flow, sampling
from vlm.errors import ConfigError
from vlm.eval import generation, video_files
from vlm.eval import loop as eval_loop
from vlm.models.dit import ATTENTION_KINDS, DiT
from vlm.models.text_to_video import TextToVideo
from vlm.tasks import contrastive

FM_TIMES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DIT_KEYS = ("width", "depth", "num_heads", "mlp_dim", "patch", "attention", "freq_dim", "rope_theta", "qk_norm",
            "scan_layers")


class Task:
    per_example_loss = True

    def __init__(self, config):
        self.config = config
        self.validate()
        self._loaded = {}  # workdir → (model, config) of the VAE and scorer runs, loaded once

    def validate(self) -> None:
        c, t = self.config, self.config.task
        if not 0.0 <= t.p_uncond < 1.0:
            raise ConfigError(f"config.task.p_uncond={t.p_uncond} must be in [0, 1) (text dropped for guidance)")
        if t.t_std < 0 or t.shift < 0 or t.base_tokens <= 0:
            raise ConfigError("config.task.t_std and config.task.shift must be ≥ 0 (shift 0 = from the number of "
                              "tokens) and config.task.base_tokens > 0")
        if t.weighting not in flow.LOSS_WEIGHTINGS:
            raise ConfigError(f"config.task.weighting={t.weighting!r} is unknown; choose one of "
                              f"{', '.join(flow.LOSS_WEIGHTINGS)}")
        if t.sampler not in sampling.SAMPLERS or t.sample_steps < 1:
            raise ConfigError(f"config.task.sampler={t.sampler!r} / sample_steps={t.sample_steps}: choose one of "
                              f"{', '.join(sampling.SAMPLERS)} and ≥ 1 step")
        if c.model.dit.attention not in ATTENTION_KINDS:
            raise ConfigError(f"config.model.dit.attention={c.model.dit.attention!r} is unknown; choose one of "
                              f"{', '.join(ATTENTION_KINDS)}")
        if c.model.dit.width % c.model.dit.num_heads:
            raise ConfigError(f"config.model.dit.width={c.model.dit.width} is not divisible by num_heads="
                              f"{c.model.dit.num_heads}")
        if c.data.vocab_size != c.model.text.vocab_size:
            raise ConfigError(f"config.data.vocab_size={c.data.vocab_size} differs from config.model.text.vocab_size="
                              f"{c.model.text.vocab_size}; set both to the tokenizer's vocabulary size")

    # ----- the latent cache: shape and normalisation -----

    @functools.cached_property
    def latent_info(self) -> dict:
        """Shape, per-channel statistics and VAE hash of the latent dataset `config.data.name`."""
        from input_pipeline import latents

        d = self.config.data
        try:
            info = latents.latent_info(d.name, d.data_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config.data.name={d.name!r}: {e}; build a latent cache with `vlm data encode "
                              f"--vae_workdir=W --out_name=NAME_latents`") from None
        expected = self.config.task.get("vae_hash", "")
        if expected:
            latents.check_vae_hash(info, expected)
        return info

    def latent_stats(self) -> tuple:
        """The latent dataset's per-channel mean and std [c] as a hashable (("mean", ...), ("std", ...)): a static
        argument of the jitted steps below (`dict(...)` of it is an info for input_pipeline.latents)."""
        info = self.latent_info
        return tuple((k, tuple(np.asarray(info[k], np.float32).tolist())) for k in ("mean", "std"))

    def normalize(self, z: jax.Array) -> jax.Array:
        info = self.latent_info
        return (z.astype(jnp.float32) - jnp.asarray(info["mean"], jnp.float32)) / jnp.asarray(info["std"], jnp.float32)

    def denormalize(self, x: jax.Array) -> jax.Array:
        info = self.latent_info
        return x * jnp.asarray(info["std"], jnp.float32) + jnp.asarray(info["mean"], jnp.float32)

    def shift(self, latent_shape) -> float:
        """The timestep shift: task.shift, or sqrt(tokens / base_tokens) (SD3 / Open-Sora) when it is 0."""
        t = self.config.task
        if t.shift > 0:
            return float(t.shift)
        grid = [s // p for s, p in zip(latent_shape[:3], self.config.model.dit.patch)]
        return flow.resolution_shift(int(np.prod(grid)), int(t.base_tokens))

    # ----- model and loss -----

    def build_model(self, rngs: nnx.Rngs) -> TextToVideo:
        m = self.config.model
        text = contrastive.build_text_tower(m, self.config.data.max_text_len, rngs)
        channels = int(m.dit.get("in_channels", 0) or self.latent_info["shape"][-1])
        dit = DiT(in_channels=channels, context_width=m.text.width, remat=m.remat, dtype=jnp.dtype(m.dtype),
                  attention_impl=m.attention_impl, context_parallel=m.get("context_parallel", "none"), rngs=rngs,
                  **{k: (tuple(m.dit[k]) if k == "patch" else m.dit[k]) for k in DIT_KEYS if k in m.dit})
        return TextToVideo(text, dit)

    def features(self, model: TextToVideo, batch, rng) -> dict[str, jax.Array]:
        x0 = self.normalize(batch["latents"])  # [B, t, h, w, c]
        b, t_cfg = x0.shape[0], self.config.task
        k_t, k_noise, k_drop = jax.random.split(rng, 3)
        t = flow.sample_timesteps(k_t, b, mean=t_cfg.t_mean, std=t_cfg.t_std, shift=self.shift(x0.shape[1:]))
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        states, mask = model.text_states(batch["tokens"])
        states, mask = model.dit.drop_context(states, mask, jax.random.uniform(k_drop, (b,)) < t_cfg.p_uncond)
        v = model.dit(flow.interpolate(x0, noise, t), t, states, mask)
        return {"loss": flow.flow_loss(v, x0, noise, t, t_cfg.weighting), "t": t}  # [B] each

    def loss(self, model, features, batch):
        del model, batch
        return features["loss"].mean(), {}

    # ----- sampling -----

    def sampler(self, model: TextToVideo):
        """A jitted fn(tokens [B, L], noise [B, t, h, w, c], guidance) → latents (denormalised) [B, t, h, w, c]."""
        graphdef, state = nnx.split(model)
        t = self.config.task

        def run(tokens, noise, *, guidance=None, steps=None, method=None):
            return _generate(graphdef, state, tokens, noise, jnp.float32(t.guidance if guidance is None else guidance),
                             stats=self.latent_stats(), steps=int(steps or t.sample_steps), method=method or t.sampler,
                             shift=self.shift(noise.shape[1:]))

        return run

    # ----- evaluation -----

    def evaluators(self):
        return {"fm_loss": self.fm_loss, "generation": self.generation}

    def fm_loss(self, model: TextToVideo, *, mesh, step: int, workdir: str | None, num_batches: int = 0,
                seed: int = 0) -> dict[str, float]:
        """Held-out flow-matching loss at fixed t and fixed noise (per example index), no text dropout."""
        graphdef, state = nnx.split(model)
        counter = iter(range(1 << 30))
        stats = self.latent_stats()
        losses = lambda batch: _fm_losses(graphdef, state, batch, next(counter), stats=stats, seed=seed)
        out, _ = eval_loop.eval_outputs(losses, self.config.data,
                                        global_batch_size=self.config.eval_batch_size, mesh=mesh, host_keys=(),
                                        max_batches=num_batches or None)
        per_t = out["fm"].mean(0)
        return {"fm_loss": float(per_t.mean()), **{f"fm_loss_t{t:.1f}": float(v) for t, v in zip(FM_TIMES, per_t)}}

    def _run(self, workdir: str):
        """(model, config) of another run (the VAE, the scorer), EMA weights if kept; loaded once."""
        if workdir not in self._loaded:
            from vlm import train

            model, config, _ = train.load_model(workdir)
            self._loaded[workdir] = (model, config)
        return self._loaded[workdir]

    def decode_videos(self, latents: np.ndarray) -> np.ndarray:
        """Latents [N, t, h, w, c] → uint8 videos [N, T, H, W, 3] through the VAE run `model.vae_workdir`."""
        vae_dir = self.config.model.vae_workdir
        if not vae_dir:
            raise ConfigError("config.model.vae_workdir is empty: name the VAE run that made the latent cache")
        graphdef, state = nnx.split(self._run(vae_dir)[0])
        return np.concatenate([np.asarray(_decode_latents(graphdef, state, jnp.asarray(latents[i:i + 8])))
                               for i in range(0, len(latents), 8)])

    def generation(self, model: TextToVideo, *, mesh, step: int, workdir: str | None, scorer_workdir: str = "",
                   num_prompts: int = 64, steps: int = 0, guidance: float | None = None, sampler: str = "",
                   seed: int = 0) -> dict[str, float]:
        """Samples one video per held-out prompt and scores them with the dual-encoder run `scorer_workdir`."""
        if not scorer_workdir:
            raise ConfigError("config.evals.<generation>.scorer_workdir is empty: name a dual-encoder run trained on "
                              "the same data")
        generate = self.sampler(model)
        shape = tuple(self.latent_info["shape"])
        key = jax.random.key(seed)
        counter = iter(range(1 << 30))

        def fn(batch):
            index = next(counter)
            noise = jax.random.normal(jax.random.fold_in(key, index), (batch["tokens"].shape[0], *shape), jnp.float32)
            return {"generated": generate(batch["tokens"], noise, guidance=guidance, steps=steps, method=sampler),
                    "real": batch["latents"]}

        batches = -(-num_prompts // self.config.eval_batch_size)
        out, host = eval_loop.eval_outputs(fn, self.config.data, global_batch_size=self.config.eval_batch_size,
                                           mesh=mesh, max_batches=batches)
        prompts = host["caption"][:num_prompts]
        generated = self.decode_videos(out["generated"][:num_prompts])
        real = self.decode_videos(out["real"][:num_prompts])  # the VAE's reconstructions of the real clips
        metrics = self._score(generated, real, prompts, scorer_workdir)
        if workdir and jax.process_index() == 0:
            folder = epath.Path(workdir) / "samples" / str(step)
            folder.mkdir(parents=True, exist_ok=True)
            clips = video_files.grid(generated[:16], columns=4)
            video_files.write(str(folder / "generated.mp4"), clips, scale=4)
            video_files.write(str(folder / "generated.gif"), clips, scale=2)
            (folder / "prompts.json").write_text(json.dumps(prompts[:16], indent=1))
        return metrics

    def _score(self, generated: np.ndarray, real: np.ndarray, prompts: list[str], scorer_workdir: str) -> dict:
        from input_pipeline.tokenizer import get_tokenizer

        scorer, scorer_config = self._run(scorer_workdir)
        d = scorer_config.data
        if generated.shape[2:4] != (d.resolution, d.resolution) or generated.shape[1] < d.num_frames:
            raise ConfigError(f"generated videos {generated.shape[1:4]} do not fit the scorer's {d.num_frames} frames "
                              f"of {d.resolution}px; score with a dual encoder trained on the same clips")
        tokenizer = get_tokenizer(d)
        graphdef, state = nnx.split(scorer)
        videos = lambda v: np.asarray(  # the first T frames
            _scorer_embeddings(graphdef, state, jnp.asarray(v[:, :d.num_frames]), kind="video"))
        texts = lambda captions: np.asarray(
            _scorer_embeddings(graphdef, state, jnp.asarray(tokenizer.encode(captions, d.max_text_len)), kind="text"))
        gen_emb, real_emb, prompt_emb = videos(generated), videos(real), texts(prompts)
        metrics = {"gen_t2v_r1": generation.prompt_top1(gen_emb @ prompt_emb.T),
                   "gen_t2v_r1_chance": 1.0 / len(prompts),
                   "gen_fd": generation.frechet_distance(gen_emb, real_emb),
                   "real_t2v_r1": generation.prompt_top1(real_emb @ prompt_emb.T)}
        try:
            changed = {a: texts([generation.changed_caption(p, a) for p in prompts]) for a in generation.ATTRIBUTES}
        except ValueError:  # not synthetic captions: no attribute scores
            return metrics
        metrics.update({f"gen_attr_{a}": v for a, v in generation.attribute_scores(gen_emb, prompt_emb, changed).items()})
        return metrics


# The jitted sampling and evaluation steps are module functions, not closures made per call: every eval of a run
# reuses one compiled program (graphdef, latent statistics and options static, equal from eval to eval; weights as
# arguments), and the jit cache holds no task (with its loaded VAE and scorer).
@functools.partial(jax.jit, static_argnames=("graphdef", "stats", "steps", "method", "shift"))
def _generate(graphdef, state, tokens, noise, guidance, *, stats: tuple, steps: int, method: str, shift: float):
    """Latents (denormalised) [B, t, h, w, c] sampled from noise [B, t, h, w, c] for tokens [B, L]."""
    from input_pipeline import latents

    m = nnx.merge(graphdef, state)
    states, mask = m.text_states(tokens)
    states2, mask2 = m.dit.guidance_context(states, mask)
    x0 = sampling.sample(lambda x, s: m.dit(x, s, states2, mask2), noise, steps=steps, sampler=method, shift=shift,
                         guidance=guidance)
    return latents.denormalize(x0, dict(stats))


@functools.partial(jax.jit, static_argnames=("graphdef", "stats", "seed"))
def _fm_losses(graphdef, state, batch, index, *, stats: tuple, seed: int):
    """{"fm": [B, len(FM_TIMES)]}: the flow-matching loss of each example at each fixed t, the noise fixed by
    (seed, batch index)."""
    from input_pipeline import latents

    m = nnx.merge(graphdef, state)
    x0 = latents.normalize(batch["latents"].astype(jnp.float32), dict(stats))
    b = x0.shape[0]
    states, mask = m.text_states(batch["tokens"])

    def at(t):
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), x0.shape, jnp.float32)
        tt = jnp.full((b,), t)
        v = m.dit(flow.interpolate(x0, noise, tt), tt, states, mask)
        return flow.flow_loss(v, x0, noise, tt, "uniform")  # [B]

    return {"fm": jax.lax.map(at, jnp.asarray(FM_TIMES, jnp.float32)).T}


@functools.partial(jax.jit, static_argnames="graphdef")
def _decode_latents(graphdef, state, latents):
    """Latents [b, t, h, w, c] → uint8 video [b, T, H, W, 3] through the VAE (graphdef, state)."""
    from vlm.models import video_vae, video_vae_tiling

    return video_vae.to_uint8(video_vae_tiling.decode_chunked(nnx.merge(graphdef, state), latents))


@functools.partial(jax.jit, static_argnames=("graphdef", "kind"))
def _scorer_embeddings(graphdef, state, inputs, *, kind: str):
    """The dual-encoder scorer's embeddings [b, E] of uint8 videos [b, T, H, W, 3] (kind "video") or tokens
    [b, L] ("text")."""
    scorer = nnx.merge(graphdef, state)
    return scorer.embed_video(inputs) if kind == "video" else scorer.embed_text(inputs)


def sample_to_file(workdir: str, prompt: str, out: str, *, num_frames: int = 0, steps: int = 0,
                   guidance: float | None = None, seed: int = 0, sampler: str = "") -> str:
    """`vlm sample`: one video for `prompt` from the run in `workdir` (EMA weights when kept), decoded by its
    VAE run, written to `out` (.mp4) and beside it as .gif. num_frames 0 = the latent cache's clip length."""
    from input_pipeline.tokenizer import get_tokenizer
    from vlm import train

    model, config, step = train.load_model(workdir)
    task = Task(config)
    shape = list(task.latent_info["shape"])
    if num_frames:
        if (num_frames - 1) % 4:
            raise ConfigError(f"--num_frames={num_frames}: the causal VAE decodes 1 + 4k frames (e.g. 9, 17, 33)")
        shape[0] = 1 + (num_frames - 1) // 4
    tokens = get_tokenizer(config.data).encode([prompt], config.data.max_text_len)
    noise = jax.random.normal(jax.random.key(seed), (1, *shape), jnp.float32)
    latents = task.sampler(model)(jnp.asarray(tokens), noise, guidance=guidance, steps=steps, method=sampler)
    video = task.decode_videos(np.asarray(latents))[0]  # uint8 [T, H, W, 3]
    video_files.write(out, video, scale=4)
    gif = str(epath.Path(out).with_suffix(".gif"))
    video_files.write(gif, video, scale=4)
    return f"wrote {out} and {gif}: {video.shape[0]} frames of {video.shape[1]}x{video.shape[2]} (step {step})"
