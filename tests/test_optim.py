import jax.numpy as jnp
import numpy as np

from configs import dual_encoder
from vlm import optim


def test_schedule_warmup_then_cosine_to_end():
    c = dual_encoder.get_config("tiny").optim
    c.lr, c.warmup_steps, c.end_lr_ratio = 1e-3, 10, 0.1
    s = optim.learning_rate_schedule(c, total_steps=110)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(s(60), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # halfway down the cosine
    np.testing.assert_allclose(s(110), 1e-4, rtol=1e-5)


def test_weight_decay_only_on_kernels():
    params = {
        "video": {"mlp": {"up": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}, "norm": {"scale": jnp.ones(2)},
                  "temporal_pos": {"table": jnp.ones((2, 2))}},
        "text": {"embed": {"embedding": jnp.ones((4, 2))}},
        "logit_scale": jnp.ones(()),
    }
    mask = optim.weight_decay_mask(params)
    assert mask["video"]["mlp"]["up"]["kernel"] is True
    assert not any([mask["video"]["mlp"]["up"]["bias"], mask["video"]["norm"]["scale"],
                    mask["video"]["temporal_pos"]["table"], mask["text"]["embed"]["embedding"], mask["logit_scale"]])


def test_clipping_bounds_the_update():
    c = dual_encoder.get_config("tiny").optim
    c.schedule, c.warmup_steps, c.weight_decay, c.grad_clip_norm, c.lr = "constant", 0, 0.0, 1.0, 1e-3
    tx, _ = optim.create_optimizer(c, total_steps=10)
    params = {"w": {"kernel": jnp.zeros(3)}}
    state = tx.init(params)
    huge = {"w": {"kernel": jnp.array([3e4, 4e4, 0.0])}}
    updates, _ = tx.update(huge, state, params)
    # Clipped to norm 1, then Adam's first step ≈ -lr * sign(g).
    np.testing.assert_allclose(updates["w"]["kernel"], [-1e-3, -1e-3, 0.0], atol=1e-6)
