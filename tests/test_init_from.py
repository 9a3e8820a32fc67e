"""Starting a run from another run's weights: renaming, exact values, other meshes, one-line errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.helpers import SMALL_OVERRIDES, load_checkpoint_params, run_vlm, small_config
from vlm import init_from, sharding, train
from vlm.errors import ConfigError


def flat(tree):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def init_config(source, **overrides):
    c = small_config()
    c.init_from.update(dict(workdir=str(source), **overrides))
    return c


def test_mapped_paths_get_the_source_values_and_the_rest_keeps_its_init(ema_run):
    """Saved on fsdp=8 (the shared run, EMA on), loaded on data=2 with a renaming mapping."""
    source, _ = ema_run
    config = small_config(data=2, fsdp=1, tensor=1)
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:2])
    setup = train.build(config, mesh)
    mapping = ((r"video/(.*)", r"video/\1"), (r"video_proj/(.*)", r"text_proj/\1"), (r"(text|text_proj)/.*", ""),
               (r"logit_.*", ""))
    config.init_from.update(dict(workdir=str(source), mapping=mapping))
    plan = init_from.plan(config.init_from, setup.abstract_state["params"])
    assert plan.step == 10 and plan.item == "ema"  # the source kept an EMA: it is what loads by default
    with sharding.use_mesh(mesh, setup.rules):
        fresh = setup.init()
        fresh_params = flat(fresh["params"])
        params = init_from.apply(plan, fresh["params"], setup.state_shardings["params"])
    loaded, src = flat(params), flat(load_checkpoint_params(source, 10, "ema"))
    # Exactly the source's values at the mapped paths (video tower; video_proj renamed onto text_proj) ...
    video = [k for k in loaded if k.startswith("video/")]
    assert len(video) > 10 and len(plan.renames) == len(video) + 1
    for k in video:
        np.testing.assert_array_equal(loaded[k], src[k])
    np.testing.assert_array_equal(loaded["text_proj/kernel"], src["video_proj/kernel"])
    # ... and the fresh init everywhere else.
    others = [k for k in loaded if not k.startswith("video/") and k != "text_proj/kernel"]
    assert sorted(plan.kept_init) == sorted(others) and "text/embed/embedding" in others
    for k in others:
        np.testing.assert_array_equal(loaded[k], fresh_params[k])
    # Placed on the target mesh (data=2), as the fresh init was.
    leaf = params["video"]["encoder"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert leaf.sharding == setup.state_shardings["params"]["video"]["encoder"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert plan.summary().startswith(f"init_from: loaded {len(video) + 1} tensors from ")


def test_identity_mapping_loads_everything_and_params_item_on_request(ema_run):
    source, _ = ema_run
    config = init_config(source, use_ema=False)
    setup = train.build(config, sharding.create_mesh(config.mesh))
    plan = init_from.plan(config.init_from, setup.abstract_state["params"])
    assert plan.item == "params" and plan.kept_init == [] and plan.left_out == []
    assert len(plan.renames) == len(jax.tree.leaves(setup.abstract_state["params"]))


@pytest.mark.parametrize("overrides, message", [
    (dict(mapping=((r"video/(.*)", r"video/\1"),)), "matches no mapping pattern"),  # unmatched source (strict)
    (dict(mapping=((r"(.*)", r"encoder/\1"),)), "→ encoder/logit_bias, which is not a parameter of the model"),
    (dict(mapping=(("text/pos/table", "video/spatial_pos/table"), (".*", ""))),
     "source tensor text/pos/table has shape (8, 32) but the model's video/spatial_pos/table has shape (4, 32)"),
    (dict(mapping=(("video/(", "x"),)), "is not a valid regex"),
    (dict(step=7), "config.init_from.step=7"),
])
def test_bad_mappings_are_one_line_errors(ema_run, overrides, message):
    source, _ = ema_run
    config = init_config(source, **overrides)
    setup = train.build(config, sharding.create_mesh(config.mesh))
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        init_from.plan(config.init_from, setup.abstract_state["params"])
    assert "\n" not in str(e.value)


def test_non_strict_leaves_unmatched_source_tensors_out(ema_run):
    source, _ = ema_run
    config = init_config(source, mapping=((r"video/(.*)", r"video/\1"),), strict=False)
    setup = train.build(config, sharding.create_mesh(config.mesh))
    plan = init_from.plan(config.init_from, setup.abstract_state["params"])
    assert plan.left_out and all(not k.startswith("video/") for k in plan.left_out)
    assert all(k.startswith("video/") for k in plan.renames)


def test_cli_wrong_mapping_exits_2_before_compiling(ema_run, tmp_path):
    source, _ = ema_run
    proc = run_vlm("train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES, f"--workdir={tmp_path}/w",
                   f"--config.init_from.workdir={source}", "--config.model.video.mlp_dim=48",
                   f"--config.data.data_dir={tmp_path}/data", devices=1)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("W1", "I1", "WARNING"))]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0] == (
        "error: config.init_from: source tensor video/encoder/blocks/0/mlp/down/kernel has shape (64, 32) but the "
        "model's video/encoder/blocks/0/mlp/down/kernel has shape (48, 32)"), lines
    assert not (tmp_path / "w" / "checkpoints").exists() or not list((tmp_path / "w" / "checkpoints").iterdir())


def test_other_scan_layout_is_found_by_name_and_shape():
    """Per-block source tensors A/i/B fill a stacked A/B [L, ...] in block order, and a stacked source fills A/i/B."""
    blocks = {f"tower/blocks/{i}/mlp/kernel": (4, 8) for i in (2, 0, 1)}
    stacked, sliced = init_from._other_layout({**blocks, "head/kernel": (8, 2)},
                                              {"tower/blocks/mlp/kernel": (3, 4, 8), "head/kernel": (8, 2)})
    assert stacked == {"tower/blocks/mlp/kernel": [f"tower/blocks/{i}/mlp/kernel" for i in range(3)]} and not sliced
    stacked, sliced = init_from._other_layout({"tower/blocks/mlp/kernel": (3, 4, 8)}, blocks)
    assert sliced == {f"tower/blocks/{i}/mlp/kernel": ("tower/blocks/mlp/kernel", i) for i in range(3)} and not stacked
    # A stack of another depth is no match (the plan then names the tensor in a one-line error).
    assert init_from._other_layout(blocks, {"tower/blocks/mlp/kernel": (4, 4, 8)}) == ({}, {})


def test_a_run_loads_into_the_other_scan_layers_setting_and_back(ema_run, tmp_path):
    """model.video / model.text scan_layers changes the parameter layout; init_from converts either way, onto a
    sharded mesh, with the source's exact values."""
    import orbax.checkpoint as ocp

    source, _ = ema_run
    src = flat(load_checkpoint_params(source, 10, "ema"))
    config = small_config(data=1, fsdp=2, tensor=1)
    config.model.video.scan_layers = config.model.text.scan_layers = True
    config.init_from.update(dict(workdir=str(source)))
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:2])
    setup = train.build(config, mesh)
    plan = init_from.plan(config.init_from, setup.abstract_state["params"])
    assert plan.stacked and not plan.sliced and plan.kept_init == [] and plan.left_out == []
    assert "stacked from per-block tensors" in plan.summary()
    with sharding.use_mesh(mesh, setup.rules):
        params = init_from.apply(plan, setup.init()["params"], setup.state_shardings["params"])
    loaded = flat(params)
    kernel = "video/encoder/blocks/mlp/up/kernel"
    assert loaded[kernel].shape == (1, *src["video/encoder/blocks/0/mlp/up/kernel"].shape)
    for name, value in loaded.items():
        unrolled = name.replace("encoder/blocks/", "encoder/blocks/0/")
        np.testing.assert_array_equal(value, src[unrolled][None] if unrolled != name else src[name])
    assert params["video"]["encoder"]["blocks"]["mlp"]["up"]["kernel"].sharding == \
        setup.state_shardings["params"]["video"]["encoder"]["blocks"]["mlp"]["up"]["kernel"]
    # ... and back: the scanned parameters, saved as a run's checkpoint, load into the unrolled model.
    scanned_run = tmp_path / "scanned"
    ocp.PyTreeCheckpointer().save(scanned_run / "checkpoints" / "3" / "params", jax.device_get(params))
    back = small_config(data=1, fsdp=2, tensor=1)
    back.init_from.update(dict(workdir=str(scanned_run)))
    setup = train.build(back, mesh)
    plan = init_from.plan(back.init_from, setup.abstract_state["params"])
    assert plan.sliced and not plan.stacked and plan.kept_init == []
    with sharding.use_mesh(mesh, setup.rules):
        restored = flat(init_from.apply(plan, setup.init()["params"], setup.state_shardings["params"]))
    assert restored.keys() == src.keys()
    for name, value in restored.items():
        np.testing.assert_array_equal(value, src[name])
