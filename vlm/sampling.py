"""ODE samplers for rectified flow (Euler, Heun) with classifier-free guidance.

A velocity function maps (x [B, ...], t float32 [B]) → v [B, ...] with v ≈ ε − x0 (vlm/flow.py).
Sampling integrates dx/dt = v from t = 1 (x = noise) down to t = 0 over the shifted grid
`timesteps(steps, shift)`. The loop is a `lax.fori_loop`, so jitting the caller jits the whole loop;
everything is batched and follows the input's sharding (it works under `vlm.sharding.use_mesh`).
Samplers are deterministic: a fixed seed for the noise gives a fixed sample.

    noise = jax.random.normal(jax.random.key(seed), (B, t, h, w, c))
    context2, mask2 = model.guidance_context(context, mask)          # [2B, L, Dc]: conditional, then null
    x0 = sample(lambda x, t: model(x, t, context2, mask2), noise,
                steps=50, sampler="euler", shift=5.0, guidance=5.0)

Model evaluations: Euler `steps`, Heun 2·`steps` (each a [2B] batch when guided).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vlm.flow import check_shift, shift_timesteps

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
SAMPLERS = ("euler", "heun")


def timesteps(steps: int, shift: float | jax.Array = 1.0) -> jax.Array:
    """The sampling grid float32 [steps + 1]: shift_timesteps(1 − i/steps), from 1 to 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return shift_timesteps(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)


def guided(velocity_fn: VelocityFn, guidance: float | jax.Array) -> VelocityFn:
    """Classifier-free guidance with the conditional and unconditional predictions in ONE call.

    velocity_fn takes a doubled batch [2B, ...] whose first half is conditional and second half
    unconditional (e.g. `DiT.guidance_context`). Returns (x [B, ...], t [B]) →
    v_u + g·(v_c − v_u), float32 [B, ...]; g = 1 is the conditional prediction, g = 0 the unconditional.
    """

    def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
        b = x.shape[0]
        v = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t])).astype(jnp.float32)  # [2B, ...]
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + guidance * (v_cond - v_uncond)

    return velocity


def sample(velocity_fn: VelocityFn, noise: jax.Array, *, steps: int, sampler: str = "euler",
           shift: float | jax.Array = 1.0, guidance: float | jax.Array | None = None) -> jax.Array:
    """Integrates from noise [B, ...] at t = 1 to x0 float32 [B, ...] at t = 0.

    guidance None: velocity_fn is called on [B, ...] batches; otherwise on [2B, ...] batches as in `guided`.
    steps, sampler (and whether guidance is None) are static; shift and guidance may be traced.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_shift(shift)
    velocity = velocity_fn if guidance is None else guided(velocity_fn, guidance)
    ts = timesteps(steps, shift)  # [steps + 1]
    b = noise.shape[0]
    v = lambda x, t: velocity(x, jnp.full((b,), t, jnp.float32)).astype(jnp.float32)

    def step(i, x):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # < 0
        d = v(x, t)
        if sampler == "euler":
            return x + dt * d
        d_next = v(x + dt * d, t_next)  # Heun: average the slopes at both ends of the Euler step
        return x + dt * 0.5 * (d + d_next)

    return jax.lax.fori_loop(0, steps, step, noise.astype(jnp.float32))
