"""vlm.nn.rng.params_key: the keys `rngs.params()` gives, at a cost that does not grow with the trace."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm.nn.rng import params_key
from vlm.nn.transformer import Encoder


def draws(next_key, rngs: nnx.Rngs, n: int = 4) -> jax.Array:
    return jnp.stack([jax.random.key_data(next_key(rngs)) for _ in range(n)])


def test_params_key_returns_the_keys_of_rngs_params_eagerly_under_jit_and_per_layer():
    ours, flax_own = params_key, lambda rngs: rngs.params()
    for seed in (0, 7):
        np.testing.assert_array_equal(draws(ours, nnx.Rngs(seed)), draws(flax_own, nnx.Rngs(seed)))
        np.testing.assert_array_equal(jax.jit(lambda: draws(ours, nnx.Rngs(seed)))(),
                                      jax.jit(lambda: draws(flax_own, nnx.Rngs(seed)))())
        np.testing.assert_array_equal(draws(ours, nnx.Rngs(params=seed + 1, default=seed)),
                                      draws(flax_own, nnx.Rngs(params=seed + 1, default=seed)))

    def per_layer(next_key):  # as vlm/nn/scan.py builds stacked layers: a split of the stream per layer
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def build(rngs):
            return draws(next_key, rngs)

        rngs = nnx.Rngs(0)
        return build(rngs), draws(next_key, rngs)  # [3, 4, 2] per layer, then the stream after the split

    for a, b in zip(per_layer(ours), per_layer(flax_own)):
        np.testing.assert_array_equal(a, b)


def test_building_a_model_under_a_trace_takes_time_linear_in_its_depth():
    """With `rngs.params()` (flax 0.12) a 32-block encoder took 29x a 4-block one under nnx.eval_shape (each key
    drawn scanned the whole trace so far); linear is 8x."""
    def seconds(depth: int) -> float:
        # This thread's CPU time, not the wall clock: under pytest-xdist another worker's compile shares the
        # cores, and a wall-clock ratio flaked (0.99 / 0.056 s = 17.6x once in a full-suite run, ~8x alone).
        best = float("inf")
        for _ in range(5):
            start = time.thread_time()
            nnx.eval_shape(lambda: Encoder(32, depth, 2, 64, rngs=nnx.Rngs(0)))
            best = min(best, time.thread_time() - start)
        return best

    seconds(1)  # warm-up
    shallow, deep = seconds(4), seconds(32)
    assert deep / shallow < 16, (shallow, deep)
