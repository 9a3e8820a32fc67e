"""Parameter keys from `nnx.Rngs`, at a cost that does not grow with the trace.

`rngs.params()` (flax 0.12) advances the stream's count through `Variable.set_value`, which compares
the new count's `.sharding` with the old one's. Under a trace (`nnx.eval_shape`, `jax.jit(init)`) both
are tracers, whose `.sharding` raises an AttributeError whose message JAX builds by scanning every
equation traced so far, so building a model cost O(parameters²): the B/16 dual encoder's construction
took 6.6 s under `nnx.eval_shape`, 85 % of it in those messages.
"""

from __future__ import annotations

import jax
from flax import nnx


def params_key(rngs: nnx.Rngs) -> jax.Array:
    """The key `rngs.params()` returns (fold_in(key, count)), advancing the count the same way, in O(1)."""
    stream = rngs.params  # the "params" stream, or "default" when there is none
    count = stream.count
    if not isinstance(count.get_raw_value(), jax.Array):  # a mutable Ref (nnx.var_defaults(ref=True)): cheap already
        return stream()
    key = jax.random.fold_in(stream.key[...], count[...])
    count.set_raw_value(count.get_raw_value() + 1)  # checks the trace level, as set_value does; no sharding compare
    return key
