"""Captioning task: its loss, CoCa's weights, starting from a dual-encoder run (exact, frozen), a sharded
step against one device, the evaluators (captions.json) and `vlm caption`."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import captioner as captioner_config
from input_pipeline import synthetic
from input_pipeline.testing import write_video
from tests.helpers import load_checkpoint_params, random_batch, read_metrics, run_vlm, small_config
from vlm import accumulation, init_from, optim, sharding, tasks, train
from vlm.errors import ConfigError
from vlm.tasks import captioning

DECODER_PARTS = ("blocks", "norm", "head")  # only the captioning loss reaches these


def small_captioner(coca: bool = False, **mesh):
    """configs/captioner.py:tiny with the video tower and data shapes of tests.helpers.small_config (the
    `ema_run` dual encoder's), so that run's tower loads; a 1-layer decoder."""
    de = small_config()
    c = captioner_config.get_config("tiny")
    c.batch_size, c.eval_batch_size, c.total_steps = 16, 16, 3
    c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 1
    c.optim.warmup_steps = 0
    c.model.video.update({k: v for k, v in de.model.video.items() if k != "projection"})  # (no projection)
    c.model.decoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    c.model.embed_dim = 16
    c.data.update(dict(num_frames=de.data.num_frames, resolution=de.data.resolution,
                       max_text_len=de.data.max_text_len, eval_size=32))
    if coca:
        c.model.coca = True
        c.model.decoder.unimodal_depth = 1
        c.task.contrastive_weight = 1.0
    c.mesh.update(mesh)
    return c


def flat(tree) -> dict[str, np.ndarray]:
    """{"video/encoder/blocks/0/mlp/up/kernel": host array}"""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return {optim.path_name(path): np.asarray(leaf) for path, leaf in leaves}


# ----- the loss -----


def test_loss_is_the_mean_over_captions_of_their_smoothed_token_losses():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)), jnp.float32)
    tokens = jnp.asarray([[5, 7, 3, 0, 0], [4, 3, 0, 0, 0], [6, 6, 8, 9, 3]], jnp.int32)  # pieces, EOS (3), padding
    out = captioning.caption_losses(logits, tokens, label_smoothing=0.1)
    labels = optax.smooth_labels(jax.nn.one_hot(tokens, 11), 0.1)
    per_token = np.asarray(optax.softmax_cross_entropy(logits, labels))  # [3, 5]
    lengths = np.array([3, 2, 5])
    expected = [per_token[i, :n].mean() for i, n in enumerate(lengths)]
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["tokens"], lengths)
    plain = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))
    np.testing.assert_allclose(out["nll"], [plain[i, :n].sum() for i, n in enumerate(lengths)], rtol=1e-6)
    # Padding positions do not count, whatever their logits.
    changed = captioning.caption_losses(logits.at[0, 3:].add(50.0), tokens, label_smoothing=0.1)
    np.testing.assert_array_equal(changed["loss"], out["loss"])


def test_attribute_scores_on_synthetic_captions():
    refs = ["a small red circle moves left slowly", "a large blue square moves up quickly",
            "a small red circle moves left slowly and a large blue square moves up quickly"]
    preds = ["a small red circle moves left slowly",  # all right
             "a large blue square moves down quickly",  # direction wrong
             "a small red circle moves left slowly"]  # one object of two: count wrong
    s = captioning.attribute_scores(preds, refs)
    assert s["attributes_all_right"] == pytest.approx(1 / 3) and s["count_right"] == pytest.approx(2 / 3)
    assert s["direction"] == pytest.approx(1 / 4) and s["colour"] == pytest.approx(2 / 4)  # 4 reference objects
    assert captioning.attribute_scores(["a a a", "circle"], refs[:2])["attributes_all_right"] == 0.0


def test_heldout_references_are_one_distinct_caption_per_clip():
    """What the captions evaluator's reference sets are: on the synthetic set no two clips share a caption."""
    config = captioner_config.get_config("tiny")
    captions = [synthetic.SyntheticVideoCaptions("heldout", config.data.eval_size, 1, 16).caption(i)
                for i in range(config.data.eval_size)]
    assert len(set(captions)) == len(captions) == 256


# ----- config errors -----


@pytest.mark.parametrize("key, value, message", [
    ("model.decoder.vocab_size", 64, "config.data.vocab_size=128 differs from config.model.decoder.vocab_size=64"),
    ("evals.captions.max_len", 9, "config.evals.captions.max_len=9 must be in 0..config.data.max_text_len=8"),
    ("evals.captions.beam_size", 0, "config.evals.captions.beam_size=0 must be ≥ 1"),
    ("evals.captions.decode", "nucleus", "config.evals.captions.decode='nucleus' is unknown"),
    ("task.contrastive_weight", -1.0, "must be ≥ 0"),
    ("task.contrastive_weight", 1.0, "config.task.contrastive_weight=1.0 needs config.model.coca=True"),
    ("task.label_smoothing", 1.0, "config.task.label_smoothing=1.0 must be in [0, 1)"),
    ("model.coca", True, "config.model.coca=True needs config.model.decoder.unimodal_depth ≥ 1"),
    ("model.video.tubelet", (2, 5, 5), "config.data.resolution=16 is not divisible by the patch size 5x5"),
])
def test_config_errors_are_one_line(key, value, message):
    config = small_captioner()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    with config.unlocked():
        node[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        tasks.get(config)
    assert "\n" not in str(e.value)


# ----- CoCa: which weight reaches which parameters -----


@pytest.fixture(scope="module")
def coca_results():
    """One batch through a CoCa captioner (one compile): the trainer's loss and gradient with the caption
    weight 0, the loss with the contrastive weight 0, and the plain teacher-forced captioning loss."""
    config = small_captioner(coca=True)
    variants = {}
    for name, overrides in (("caption_weight_0", dict(caption_weight=0.0)),
                            ("contrastive_weight_0", dict(contrastive_weight=0.0))):
        c = config.copy_and_resolve_references()
        c.task.update(overrides)
        variants[name] = tasks.get(c)
    graphdef, params, _ = nnx.split(variants["caption_weight_0"].build_model(nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    batch = {k: jnp.asarray(v) for k, v in random_batch(config).items()}

    @jax.jit
    def run(params, batch):
        (loss, metrics, _), grads = accumulation.loss_and_grads(variants["caption_weight_0"], graphdef, params, {},
                                                                batch, jax.random.key(0), microbatches=1)
        model, task = nnx.merge(graphdef, params), variants["contrastive_weight_0"]
        plain_loss, plain_metrics = task.loss(model, task.features(model, batch, None), batch)
        logits = model.caption_logits(batch["video"], batch["tokens"])  # no CoCa embeddings at all
        return {"caption_weight_0": dict(loss=loss, metrics=metrics, grads=grads),
                "contrastive_weight_0": dict(loss=plain_loss, metrics=plain_metrics),
                "plain_caption_loss": captioning.caption_losses(logits, batch["tokens"],
                                                                config.task.label_smoothing)["loss"].mean()}

    results = jax.device_get(run(params, batch))
    results["caption_weight_0"]["grads"] = flat(results["caption_weight_0"]["grads"])
    return results, {name: task.per_example_loss for name, task in variants.items()}


def test_coca_caption_weight_zero_gives_the_decoder_zero_gradients(coca_results):
    results, per_example = coca_results
    r = results["caption_weight_0"]
    assert not per_example["caption_weight_0"]
    assert r["loss"] == pytest.approx(float(r["metrics"]["train/contrastive_loss"]), rel=1e-6)
    decoder = [k for k in r["grads"] if k.split("/")[0] in DECODER_PARTS]
    assert len(decoder) > 10
    for k in decoder:
        np.testing.assert_array_equal(r["grads"][k], 0.0, err_msg=k)
    # The contrastive loss trains the video tower, the unimodal text layers and the token embedding.
    for prefix in ("video/", "unimodal/", "embed/", "contrastive_pool/", "logit_scale"):
        assert max(np.abs(v).max() for k, v in r["grads"].items() if k.startswith(prefix)) > 0, prefix


def test_coca_contrastive_weight_zero_is_the_plain_captioning_loss(coca_results):
    results, per_example = coca_results
    r = results["contrastive_weight_0"]
    assert per_example["contrastive_weight_0"]  # nothing couples the batch: plain accumulation
    np.testing.assert_allclose(r["loss"], results["plain_caption_loss"], rtol=1e-6)
    assert float(r["metrics"]["train/contrastive_loss"]) > 0  # still logged


# ----- a run started from the dual-encoder run (frozen video tower, 2x2x2), the same on one device,
# its evaluators and `vlm caption`


@pytest.fixture(scope="module")
def captioner_run(ema_run, tmp_path_factory):
    """A captioner trained 3 steps on data x fsdp x tensor = 2x2x2 from the shared dual-encoder run's video
    tower (its EMA), frozen; a checkpoint every step, both evaluators at the end."""
    source, source_config = ema_run
    config = small_captioner(data=2, fsdp=2, tensor=2)
    config.data.data_dir = source_config.data.data_dir  # its cached tokenizer
    config.init_from.update(dict(workdir=str(source), mapping=((r"video/(.*)", r"video/\1"), (r".*", ""))))
    config.optim.frozen = ("video/.*",)
    workdir = tmp_path_factory.mktemp("captioner") / "w"
    train.train(config, str(workdir))
    return workdir, source, config


@pytest.fixture(scope="module")
def one_device(captioner_run):
    """The run's config on 1 device: (config, setup, state after init_from, its first global batch)."""
    from input_pipeline import pipeline

    _, _, config = captioner_run
    config = config.copy_and_resolve_references()
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    setup = train.build(config, mesh)
    batch = next(pipeline.create_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed))
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        plan = init_from.plan(config.init_from, setup.abstract_state["params"])
        state["params"] = init_from.apply(plan, state["params"], setup.state_shardings["params"])
        batch = sharding.global_batch(batch, mesh)
    return config, setup, state, batch


def test_dual_encoder_tower_loads_exactly_and_stays_frozen(captioner_run):
    workdir, source, _ = captioner_run
    src = flat(load_checkpoint_params(source, 10, "ema")["video"])
    first, last = (flat(load_checkpoint_params(workdir, step)) for step in (1, 3))
    video = [k for k in last if k.startswith("video/")]
    assert len(video) == len(src) > 10
    for k in video:
        np.testing.assert_array_equal(first[k], src[k[len("video/"):]], err_msg=k)
        np.testing.assert_array_equal(last[k], src[k[len("video/"):]], err_msg=k)
    moved = [float(np.abs(last[k] - first[k]).max()) for k in last if k.split("/")[0] in DECODER_PARTS]
    assert min(moved) > 0  # the decoder trains


def test_sharded_step_equals_single_device(captioner_run, one_device):
    """The run's first step on 8 devices (2x2x2) equals the same step on 1 device, from the same init_from
    weights and the same data."""
    workdir, _, _ = captioner_run
    _, setup, state, batch = one_device
    init = flat(state["params"])
    with sharding.use_mesh(setup.mesh, setup.rules):
        state, metrics = setup.train_step(jax.tree.map(jnp.copy, state), batch)  # the fixture's state stays
    logged = read_metrics(workdir)[0]
    assert logged["step"] == 1
    for key in ("train/loss", "train/token_accuracy"):
        np.testing.assert_allclose(logged[key], float(metrics[key]), rtol=1e-6)
    ours, theirs = flat(state["params"]), flat(load_checkpoint_params(workdir, 1))
    for k, v in ours.items():
        np.testing.assert_allclose(theirs[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    assert max(float(np.abs(ours[k] - init[k]).max()) for k in ours) > 1e-4  # the step moved the parameters


def test_evaluators_log_metrics_and_write_captions_json(captioner_run):
    workdir, _, _ = captioner_run
    final = [r for r in read_metrics(workdir) if "eval/cider" in r][-1]
    assert final["step"] == 3
    for key in ("bleu4", "rougeL", "cider", "attributes_all_right", "loss", "perplexity", "token_accuracy"):
        assert np.isfinite(final[f"eval/{key}"]), key
    # After 3 steps the argmax may still miss every token: 0.0 with tiny's joint video tower (train token accuracy
    # 0.0 at steps 1-3 too; perplexity 90 of 128).
    assert final["eval/perplexity"] > 1 and 0 <= final["eval/token_accuracy"] < 1
    saved = json.loads((workdir / "samples" / "3" / "captions.json").read_text())
    heldout = synthetic.SyntheticVideoCaptions("heldout", 32, 1, 16)
    assert [c["id"] for c in saved["captions"]] == list(range(32))
    assert [c["references"] for c in saved["captions"]] == [[heldout.caption(i)] for i in range(32)]
    assert saved["metrics"]["cider"] == pytest.approx(final["eval/cider"])
    # `vlm eval` (train.evaluate) rewrites it from the checkpoint, with the same captions and metrics.
    (workdir / "samples" / "3" / "captions.json").unlink()
    metrics = train.evaluate(str(workdir), evals="captions")
    assert metrics["step"] == 3 and metrics["eval/cider"] == pytest.approx(final["eval/cider"], rel=1e-6)
    again = json.loads((workdir / "samples" / "3" / "captions.json").read_text())
    assert again["captions"] == saved["captions"]


def test_caption_command_prints_path_tab_caption(captioner_run, tmp_path):
    workdir, _, _ = captioner_run
    paths = [write_video(str(tmp_path / f"{name}.mp4"), seed=i, seconds=0.6) for i, name in enumerate("ab")]
    proc = run_vlm("caption", f"--workdir={workdir}", *paths, "--beam_size=2", devices=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.rstrip("\n").split("\n")
    assert [line.split("\t")[0] for line in lines] == paths and all(line.count("\t") == 1 for line in lines)
    with pytest.raises(FileNotFoundError, match="video file not found: nope.mp4"):
        captioning.caption_files(str(workdir), ["nope.mp4"])
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4: cannot be decoded as a video"):
        captioning.caption_files(str(workdir), [str(tmp_path / "bad.mp4")])
