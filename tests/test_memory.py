"""Compiled memory: FSDP really divides the train state (parameters + optimizer state) over the devices."""

import math

import jax

from tests.helpers import small_config
from vlm import sharding, train


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_fsdp_state_per_device_is_an_eighth_of_the_replicated_state():
    config = small_config(data=1, fsdp=8, tensor=1)
    setup = train.build(config, sharding.create_mesh(config.mesh))
    # What one device holds once the jitted init has run: XLA's own count, nothing allocated.
    per_device = setup.init.lower().compile().memory_analysis().output_size_in_bytes
    replicated = nbytes(setup.abstract_state)  # the whole state on one device
    state = nbytes({k: setup.abstract_state[k] for k in ("params", "opt_state")})
    shards = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                 for x, s in zip(jax.tree.leaves(setup.abstract_state), jax.tree.leaves(setup.state_shardings)))
    print(f"train state: {replicated} B replicated ({state} B params + optimizer), {per_device} B per device "
          f"at fsdp=8 (shard shapes: {shards} B) = {per_device / (replicated / 8):.3f} x replicated / 8")
    assert state > 0.99 * replicated  # the rest (step, rng, counters) is a few bytes
    # Only what has no `embed` axis (attention and MLP biases, the logit scale) stays whole on every device.
    assert per_device <= 1.1 * replicated / 8
    assert shards <= per_device <= 1.05 * shards  # XLA's count agrees with the shardings (up to alignment)
