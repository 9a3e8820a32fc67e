"""Scanned layers: stacked parameters ↔ unrolled ones, and a scanned DiT equals the unrolled one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.diffusion_helpers import CHANNELS, CONTEXT_WIDTH, forward, inputs, mesh_2x2x2, place, tiny_dit
from vlm import sharding
from vlm.models.dit import DiT
from vlm.nn import scan


def layer(i: int) -> dict:
    return {"attn": {"kernel": np.full((2, 3), i, np.float32)}, "bias": np.full((3,), 10 + i, np.float32)}


def test_stack_and_unstack_layers_invert_each_other():
    params = {"head": np.ones(2), "tower": {"blocks": {i: layer(i) for i in range(4)}}}
    stacked = scan.stack_layers(params, "tower/blocks")
    assert stacked["tower"]["blocks"]["attn"]["kernel"].shape == (4, 2, 3)
    np.testing.assert_array_equal(stacked["tower"]["blocks"]["bias"][:, 0], [10, 11, 12, 13])
    assert stacked["head"] is params["head"]  # the rest is shared, not copied
    back = scan.unstack_layers(stacked, "tower/blocks")
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))
    # Groups (e.g. alternating spatial / temporal blocks): group j holds blocks j, j+g, j+2g, ...
    pairs = scan.stack_layers(params, "tower/blocks", group=2)
    np.testing.assert_array_equal(pairs["tower"]["blocks"][1]["bias"][:, 0], [11, 13])
    assert jax.tree.all(jax.tree.map(np.array_equal, scan.unstack_layers(pairs, "tower/blocks", group=2), params))
    # Checkpoints key layers by strings.
    as_strings = {"blocks": {str(i): layer(i) for i in range(4)}}
    np.testing.assert_array_equal(scan.stack_layers(as_strings, "blocks")["blocks"]["bias"][:, 0], [10, 11, 12, 13])
    with pytest.raises(ValueError, match="4 layers at 'tower/blocks' do not form groups of 3"):
        scan.stack_layers(params, "tower/blocks", group=3)
    with pytest.raises(KeyError, match="no parameters at 'tower/layers'"):
        scan.stack_layers(params, "tower/layers")


def test_match_layout_converts_either_way():
    unrolled = {"blocks": {i: layer(i) for i in range(4)}}
    stacked = scan.stack_layers(unrolled, "blocks", group=2)
    assert scan.match_layout(unrolled, stacked, "blocks", group=2)["blocks"][0]["bias"].shape == (2, 3)
    assert set(scan.match_layout(stacked, unrolled, "blocks", group=2)["blocks"]) == {0, 1, 2, 3}
    assert scan.match_layout(stacked, stacked, "blocks", group=2)["blocks"] is stacked["blocks"]
    with pytest.raises(ValueError, match="match neither the unrolled nor the scanned layout"):
        scan.match_layout({"blocks": {i: layer(i) for i in range(3)}}, stacked, "blocks", group=2)


def scanned_dit(attention: str, remat: str = "none") -> DiT:
    return nnx.eval_shape(lambda: DiT(in_channels=CHANNELS, context_width=CONTEXT_WIDTH, width=32, depth=4, num_heads=2,
                                      mlp_dim=64, attention=attention, remat=remat, scan_layers=True,
                                      rngs=nnx.Rngs(0)))


def with_params(model: nnx.Module, params: dict) -> nnx.Module:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_scanned_dit_equals_unrolled_with_converted_params(attention):
    unrolled = tiny_dit(attention=attention, depth=4, random=True)
    params = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    model = scanned_dit(attention, remat="full" if attention == "factorised" else "none")
    assert model.layer_group == (1 if attention == "full" else 2)
    stacked = scan.stack_layers(params, "blocks", model.layer_group)
    with_params(model, stacked)
    # One compiled body for all blocks: every block parameter has a leading [depth / group] "layers" axis.
    kernel = nnx.to_pure_dict(nnx.state(model, nnx.Param))["blocks"]
    kernel = (kernel if attention == "full" else kernel[1])["mlp"]["up"]["kernel"]
    assert kernel.shape == (4 // model.layer_group, 32, 64)
    x, t, context, mask = inputs()
    expected = forward(unrolled, x, t, context, mask)
    if attention == "full":
        got = forward(model, x, t, context, mask)
    else:  # sharded, with remat on the scanned body
        mesh = mesh_2x2x2()
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            graphdef, sharded = place(model, mesh)
            # The stacked axis is unsharded; the rest follows the block's own logical axes.
            assert sharded["blocks"][1]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
            batch = jax.device_put((x, t, context, mask), sharding.batch_sharding(mesh))
            got = jax.jit(lambda p, *b: nnx.merge(graphdef, p)(*b))(sharded, *batch)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(expected).max()) > 0.5  # not vacuous: the blocks really compute something


def scan_residual_bytes(remat: str) -> tuple[int, int]:
    """(number of scans, bytes the forward scan stacks for the backward pass) in the gradient of a scanned DiT."""
    graphdef, params = nnx.split(scanned_dit("full", remat=remat), nnx.Param)
    x, t, context, mask = inputs()
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, context, mask))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)  # traced only, nothing compiled
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    residuals = sum(v.aval.size * v.aval.dtype.itemsize for v in scans[0].outvars)
    return len(scans), residuals


def test_remat_policy_applies_to_the_scanned_body():
    scans, kept = scan_residual_bytes("none")
    scans_remat, kept_remat = scan_residual_bytes("full")
    assert scans == scans_remat == 2  # one forward and one backward loop over the stacked blocks, whatever the depth
    assert kept_remat < kept / 4, (kept_remat, kept)  # "full": only each block's input is kept
    with pytest.raises(ValueError, match="depth 3 must be even"):
        DiT(in_channels=CHANNELS, context_width=CONTEXT_WIDTH, width=32, depth=3, num_heads=2, mlp_dim=64,
            attention="factorised", scan_layers=True, rngs=nnx.Rngs(0))


def test_scanned_dual_encoder_trains_like_the_unrolled_one_and_counts_the_same_flops():
    """model.video / model.text scan_layers: converted parameters give the same loss and the same update, on a
    2-device fsdp mesh; XLA counts a scan's body once, so the FLOP count is made on the unrolled model."""
    from tests.helpers import random_batch, small_config
    from vlm import flops, train

    config = small_config(data=1, fsdp=2, tensor=1)
    config.model.video.depth = config.model.text.depth = 2
    scanned_config = small_config(data=1, fsdp=2, tensor=1)
    scanned_config.model.video.update(dict(depth=2, scan_layers=True))
    scanned_config.model.text.update(dict(depth=2, scan_layers=True))
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:2])
    prefixes = ("video/encoder/blocks", "text/encoder/blocks")
    results = {}
    for name, c in (("unrolled", config), ("scanned", scanned_config)):
        setup = train.build(c, mesh)
        batch = sharding.global_batch(random_batch(c, seed=3), mesh)
        with sharding.use_mesh(mesh, setup.rules):
            state = setup.init()
            if name == "unrolled":
                start = jax.device_get(state["params"])
            else:  # the unrolled run's initial parameters, stacked
                stacked = start
                for prefix in prefixes:
                    stacked = scan.stack_layers(stacked, prefix)
                assert stacked["video"]["encoder"]["blocks"]["mlp"]["up"]["kernel"].shape == (2, 32, 64)
                fresh = lambda x, s: jax.device_put(np.asarray(x), s)
                params = jax.tree.map(fresh, stacked, setup.state_shardings["params"])
                # (Adam's moments start at zero whatever the parameters: the fresh ones are the unrolled run's, stacked.)
                state = {**state, "params": params, **({"ema": params} if "ema" in state else {})}
            state, metrics = setup.train_step(state, batch)
        params = jax.device_get(state["params"])
        if name == "scanned":
            for prefix in prefixes:
                params = scan.unstack_layers(params, prefix)
        results[name] = (float(metrics["train/loss"]), params, flops.model_flops_per_step(setup, batch))
    (loss_u, params_u, flops_u), (loss_s, params_s, flops_s) = results["unrolled"], results["scanned"]
    assert abs(loss_u - loss_s) < 1e-5, (loss_u, loss_s)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_u), jax.tree.leaves(params_s), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params_u), jax.tree.leaves(start)))
    assert moved > 1e-4  # the step really updated the parameters it compares
    assert flops_u and flops_s == flops_u



def test_throughput_compile_only_compiles_from_shapes(tmp_path, monkeypatch):
    """benchmarks/throughput.py --compile_only (the B/16 unrolled-vs-scanned compile times in benchmarks/README.md)."""
    import importlib.util
    import json
    import sys

    spec = importlib.util.spec_from_file_location("throughput_bench", "benchmarks/throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput_bench", throughput)  # its dataclasses look their module up
    spec.loader.exec_module(throughput)
    small = ("batch_size=16", "data.num_frames=4", "data.resolution=16", "model.video.width=32", "model.video.depth=2",
             "model.video.num_heads=2", "model.video.mlp_dim=64", "model.text.width=32", "model.text.num_heads=2",
             "model.text.mlp_dim=64", "model.embed_dim=32")
    out = tmp_path / "t.md"
    argv = ["--config=configs/dual_encoder.py:tiny", "--compile_only", f"--out={out}", *(f"--set={s}" for s in small),
            "--sweep=scanned:model.video.scan_layers=True,model.text.scan_layers=True"]
    assert throughput.main(argv) == 0
    (row,) = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert row["compile_s"] > 0 and row["xla_bytes"] > 0 and "step_s" not in row and "error" not in row
    assert row["flops_source"] == "lowered-cpu" and row["flops_per_step"] > 0
    assert "compiled only" in out.read_text()
