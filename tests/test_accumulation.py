"""Per-example objectives accumulate microbatches with one forward and one backward each."""

import jax
import numpy as np
import pytest

from tests import toy_tasks
from tests.helpers import random_batch, small_config
from vlm import accumulation, sharding, train


def compiled_step(config):
    mesh = sharding.create_mesh(config.mesh)
    setup = train.build(config, mesh)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        batch = sharding.global_batch(random_batch(config), mesh)
        compiled = setup.train_step.lower(state, batch).compile()
        state, metrics = compiled(state, batch)
    return compiled.cost_analysis()["flops"], jax.device_get(metrics), jax.device_get(state["params"])


@pytest.fixture(scope="module")
def per_example_steps():
    toy_tasks.register()
    out = {}
    # Unrolled, so that XLA's cost analysis counts every microbatch (it counts a loop body once).
    accumulation.SCAN_UNROLL = True
    for k in (1, 4):
        config = small_config(data=2, fsdp=4, tensor=1)
        config.task.name = "toy_alignment"
        config.batch_size = 32
        config.microbatches = k
        out[k] = compiled_step(config)
    accumulation.SCAN_UNROLL = 1
    return out


def test_four_microbatches_equal_one_batch(per_example_steps):
    (_, m1, p1), (_, m4, p4) = per_example_steps[1], per_example_steps[4]
    np.testing.assert_allclose(m4["train/loss"], m1["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["train/alignment"], m1["train/alignment"], rtol=1e-5)
    np.testing.assert_allclose(m4["train/grad_norm"], m1["train/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_per_example_accumulation_adds_no_second_forward(per_example_steps):
    """Within 5 % of the k=1 step's FLOPs (a batch-level loss's GradCache would cost ~1/3 more)."""
    f1, f4 = per_example_steps[1][0], per_example_steps[4][0]
    assert abs(f4 - f1) / f1 < 0.05, (f1, f4)
