"""Rectified flow (flow matching on straight paths): noising, targets, training timesteps, loss weights.

x_t = (1 − t)·x0 + t·ε with ε ~ N(0, I), t ∈ [0, 1] (t = 1 is pure noise); the model predicts the
constant velocity dx_t/dt = ε − x0. Samplers (vlm/sampling.py) integrate it from t = 1 to 0.

Training timesteps: logit-normal (SD3): t = sigmoid(mean + std·n), n ~ N(0, 1), then shifted.
Timestep shift (SD3, Open-Sora, Wan): t' = s·t / (1 + (s − 1)·t); s > 1 moves mass to noisier t.
Larger latents need more noise to destroy the same information, so s may follow the number of
tokens: s = sqrt(num_tokens / base_tokens) (SD3's sqrt(m/n) rule; Open-Sora 1.2 multiplies the
same square roots of its spatial and temporal ratios). base_tokens = 1024 is a 512×512 image
through an 8× VAE and 2×2 patches (s = 1 there); Wan's 81×480×832 clips (32,760 tokens) get
s ≈ 5.66, near Wan's own 5.0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DEFAULT_BASE_TOKENS = 1024


def _per_example(t: jax.Array, x: jax.Array) -> jax.Array:
    """t [B] → [B, 1, ..., 1] broadcastable against x [B, ...]."""
    return t.astype(jnp.float32).reshape(t.shape[0], *([1] * (x.ndim - 1)))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x0, noise [B, ...], t [B] → x_t = (1 − t)·x0 + t·noise, float32 [B, ...]."""
    t = _per_example(t, x0)
    return (1.0 - t) * x0.astype(jnp.float32) + t * noise.astype(jnp.float32)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The rectified-flow regression target ε − x0, float32 [B, ...]."""
    return noise.astype(jnp.float32) - x0.astype(jnp.float32)


def check_shift(shift: float) -> None:
    if isinstance(shift, (int, float)) and not shift > 0:
        raise ValueError(f"the timestep shift must be > 0 (1 = no shift), got {shift}")


def shift_timesteps(t: jax.Array, shift: float | jax.Array) -> jax.Array:
    """t' = s·t / (1 + (s − 1)·t): identity at s = 1, keeps 0 and 1 fixed, s > 1 → noisier."""
    check_shift(shift)
    t = jnp.asarray(t, jnp.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_tokens: int, base_tokens: int = DEFAULT_BASE_TOKENS) -> float:
    """s = sqrt(num_tokens / base_tokens): the resolution-dependent shift (see module docstring)."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"num_tokens ({num_tokens}) and base_tokens ({base_tokens}) must be positive")
    return math.sqrt(num_tokens / base_tokens)


def sample_timesteps(key: jax.Array, batch_size: int, *, mean: float = 0.0, std: float = 1.0,
                     shift: float | jax.Array = 1.0) -> jax.Array:
    """Training times float32 [batch_size] in (0, 1): logit-normal(mean, std), then shifted by `shift`."""
    if std < 0:
        raise ValueError(f"the logit-normal std must be ≥ 0, got {std}")
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,), jnp.float32))
    return shift_timesteps(t, shift)


# Wan / DiffSynth's training weight (MaxDiffusion's "bsmntw"): a bell around t = 1/2, zero at t ∈ {0, 1}.
# Normalised by its mean under uniform t (a constant), never over the sampled batch, so a single example
# gets a finite weight that does not depend on the rest of the batch.
# ∫₀¹ (e^{−2(t−½)²} − e^{−½}) dt ≈ 0.2491
_BELL_MEAN = math.sqrt(math.pi / 2) * math.erf(math.sqrt(2) / 2) - math.exp(-0.5)
LOSS_WEIGHTINGS = ("uniform", "bell")


def loss_weights(t: jax.Array, weighting: str = "uniform") -> jax.Array:
    """Per-example loss weights float32 [B] for times t [B].

    uniform: 1 (the logit-normal sampling already concentrates training on middle t, as in SD3).
    bell: (e^{−2(t−½)²} − e^{−½}) / 0.2491, mean 1 under uniform t, in [0, 1.61].
    """
    t = jnp.asarray(t, jnp.float32)
    if weighting == "uniform":
        return jnp.ones_like(t)
    if weighting == "bell":
        return (jnp.exp(-2.0 * jnp.square(t - 0.5)) - math.exp(-0.5)) / _BELL_MEAN
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def flow_loss(velocity: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
              weighting: str = "uniform") -> jax.Array:
    """Weighted mean squared velocity error per example, float32 [B] (mean over all non-batch axes)."""
    err = jnp.square(velocity.astype(jnp.float32) - velocity_target(x0, noise))
    return loss_weights(t, weighting) * err.reshape(err.shape[0], -1).mean(-1)
