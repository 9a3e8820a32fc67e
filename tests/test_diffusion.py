"""The text-to-video diffusion task end to end, in miniature: a tiny VAE run (tests/test_autoencoding.py)
encodes a handful of clips into a latent cache, a small DiT conditioned on the `ema_run` dual encoder's
text tower (init_from, frozen) trains on it with `vlm train`; the loss halves, 20-step sampling
reproduces a memorised latent, the EMA samples and resumes bit for bit, the generation evaluator
scores decoded samples, `vlm sample` writes a video, and the sharded step equals one device."""

import os
import shutil

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dit_video
from input_pipeline import datasets, latents
from tests.helpers import jax_traces, load_checkpoint_params, read_metrics, run_vlm
from tests.test_autoencoding import overrides, tiny_vae_run
from vlm import optim, sharding, train
from vlm.errors import ConfigError
from vlm.eval import evaluators
from vlm.tasks import autoencoding, diffusion

HANDFUL = 8  # clips per split in the cache; one batch holds them all
STEPS = 100
SMALL_DIT = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch=(1, 1, 1), freq_dim=32)
# The `ema_run` dual encoder's text tower (tests/helpers.small_config), so its text/... tensors load.
SMALL_TEXT = dict(width=32, depth=1, num_heads=2, mlp_dim=64)


def settings(cache: dict, **extra) -> dict:
    s = dict(batch_size=HANDFUL, eval_batch_size=HANDFUL, total_steps=STEPS, log_every=10, eval_every=STEPS // 2,
             checkpoint_every=STEPS // 2, ema=dict(decay=0.9),
             optim=dict(warmup_steps=0, lr=3e-3),
             model=dict(dit=SMALL_DIT, text=SMALL_TEXT, vae_workdir=cache["vae_workdir"]),
             data=dict(data_dir=cache["data_dir"], eval_split="train", eval_size=HANDFUL, num_frames=5,
                       resolution=16, max_text_len=8, latent_sample=False),
             task=dict(p_uncond=0.0),
             init_from=dict(workdir=cache["text_workdir"]))
    s.update(extra)
    return s


def small_dit_config(cache: dict, **mesh):
    c = dit_video.get_config("tiny")
    s = settings(cache)
    with c.unlocked():
        for key, value in s.items():
            if isinstance(value, dict):
                c[key].update(value)
            else:
                c[key] = value
        c.evals = dict(fm_loss=dict(type="fm_loss", every=0, num_batches=1))
    c.init_from.workdir = ""  # (in-process tests start from random weights)
    c.mesh.update(mesh)
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory, ema_run):
    """A latent cache of HANDFUL train and HANDFUL held-out clips from the tiny VAE run."""
    vae_workdir, _ = tiny_vae_run(tmp_path_factory)
    data_config = train.load_config(str(vae_workdir)).data
    data_dir = str(tmp_path_factory.mktemp("dit_latents"))
    info = autoencoding.encode_dataset(str(vae_workdir), data_config, "synthetic_latents", data_dir=data_dir,
                                       max_examples=HANDFUL, chunk_size=HANDFUL, batch_size=HANDFUL,
                                       log=lambda _: None)
    return dict(vae_workdir=str(vae_workdir), data_dir=data_dir, info=info, text_workdir=str(ema_run[0]))


@pytest.fixture(scope="module")
def dit_runs(cache, tmp_path_factory):
    """`vlm train` of the small DiT for STEPS steps (checkpoints at STEPS/2 and STEPS), and a second workdir
    holding only its config and step-STEPS/2 checkpoint (an interrupted run) resumed to STEPS."""
    tmp = tmp_path_factory.mktemp("dit_runs")
    flags = ["--config=configs/dit_video.py:tiny", *overrides(settings(cache)),
             "--config.evals.generation.every=1000000", f"--config.evals.generation.scorer_workdir={cache['text_workdir']}"]
    straight, interrupted = tmp / "straight", tmp / "interrupted"
    proc = run_vlm("train", *flags, f"--workdir={straight}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.json", interrupted / "config.json")
    shutil.copytree(straight / "checkpoints" / str(STEPS // 2), interrupted / "checkpoints" / str(STEPS // 2))
    proc = run_vlm("train", *flags, f"--workdir={interrupted}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from" in proc.stdout
    return straight, interrupted


def test_initial_fm_loss_is_the_documented_value_and_training_halves_it(cache, dit_runs):
    """A fresh DiT predicts v = 0 (adaLN-Zero, zero head), so its loss is E|noise − x0|² = 1 + E[x0²] (≈ 2 on
    normalised latents); the run's held-out (here: the handful it trains on) fm_loss ends below half of it."""
    config = small_dit_config(cache)
    task = diffusion.Task(config)
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    setup = train.build(config, mesh)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init.lower().compile()()
        initial = task.fm_loss(setup.eval_model(state), mesh=mesh, step=0, workdir=None, num_batches=1)
    records = datasets.records("synthetic_latents", "train", cache["data_dir"])
    x0 = latents.normalize(np.stack([np.asarray(records[i]["latent"]) for i in range(HANDFUL)]), cache["info"])
    np.testing.assert_allclose(initial["fm_loss"], 1 + np.mean(x0**2), rtol=0.1)  # noise draws: ±10%
    final = [r for r in read_metrics(dit_runs[0]) if "eval/fm_loss" in r][-1]
    assert final["step"] == STEPS and final["eval/fm_loss"] < 0.5 * initial["fm_loss"], (final, initial)


def test_twenty_step_sampling_reproduces_a_memorised_latent(cache, dit_runs):
    model, config, step = train.load_model(str(dit_runs[0]))  # the EMA weights
    assert step == STEPS
    task = diffusion.Task(config)
    records = datasets.records("synthetic_latents", "train", cache["data_dir"])
    from input_pipeline.tokenizer import get_tokenizer

    captions = [records[i]["captions"][0].decode() for i in range(HANDFUL)]
    tokens = get_tokenizer(config.data).encode(captions, config.data.max_text_len)
    real = np.stack([np.asarray(records[i]["latent"]) for i in range(HANDFUL)])
    noise = jax.random.normal(jax.random.key(1), real.shape, jnp.float32)
    generated = np.asarray(task.sampler(model)(jnp.asarray(tokens), noise, guidance=1.0, steps=20, method="euler"))
    norm = lambda z: latents.normalize(z, cache["info"])
    mse = np.mean((norm(generated) - norm(real)) ** 2, axis=(1, 2, 3, 4))  # [HANDFUL], normalised units
    assert np.median(mse) < 0.1, mse  # a fresh model's sample is the noise itself: MSE ≈ 2


def test_ema_is_used_for_sampling_and_resumes_bit_for_bit(dit_runs):
    straight, interrupted = dit_runs
    losses = lambda w: [(r["step"], r["train/loss"]) for r in read_metrics(w) if "train/loss" in r]
    resumed = losses(interrupted)
    assert resumed[0][0] > STEPS // 2 and resumed == [r for r in losses(straight) if r[0] > STEPS // 2]
    for item in ("params", "ema"):
        a, b = load_checkpoint_params(straight, STEPS, item), load_checkpoint_params(interrupted, STEPS, item)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    ema, params = load_checkpoint_params(straight, STEPS, "ema"), load_checkpoint_params(straight, STEPS, "params")
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))
    model, _, _ = train.load_model(str(straight))  # EMA by default
    loaded, saved = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))), flat(ema)
    assert loaded.keys() == saved.keys()
    for key in loaded:
        np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)


def flat(tree) -> dict[str, np.ndarray]:
    """{"dit/blocks/0/mlp/up/kernel": host array}"""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return {optim.path_name(path): np.asarray(leaf) for path, leaf in leaves}


def test_text_tower_is_loaded_from_the_dual_encoder_and_stays_frozen(cache, dit_runs):
    source = flat(load_checkpoint_params(cache["text_workdir"], 10, "ema"))  # init_from.use_ema (the default)
    params = flat(load_checkpoint_params(dit_runs[0], STEPS, "params"))
    text_keys = [k for k in params if k.startswith("text/")]
    assert text_keys and all(k in source for k in text_keys)
    for k in text_keys:
        np.testing.assert_array_equal(params[k], source[k], err_msg=k)


def test_generation_evaluator_scores_samples_and_vlm_sample_writes_a_video(dit_runs, tmp_path):
    """The run's last step ran every evaluator: the generation metrics (scored by the `ema_run` dual
    encoder on the VAE's decodes) and the sample grid; `vlm sample` decodes one prompt to mp4 + gif."""
    straight = dit_runs[0]
    final = [r for r in read_metrics(straight) if "eval/gen_t2v_r1" in r][-1]
    assert final["step"] == STEPS and final["eval/gen_t2v_r1_chance"] == 1 / HANDFUL
    for key in ("eval/gen_t2v_r1", "eval/real_t2v_r1", "eval/gen_attr_colour"):
        assert 0 <= final[key] <= 1, key
    assert np.isfinite(final["eval/gen_fd"]) and final["eval/gen_fd"] >= 0
    with av.open(str(straight / "samples" / str(STEPS) / "generated.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5  # the cache's clips: 5 frames
    out = tmp_path / "red.mp4"
    proc = run_vlm("sample", f"--workdir={straight}", "--prompt=a large red circle moves left quickly", f"--out={out}",
                   "--steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3) and out.with_suffix(".gif").exists()


def test_evaluators_compile_once_and_repeat_the_runs_numbers(dit_runs):
    """fm_loss and generation (sampling, the VAE's decode, the scorer's embeddings) in this process with one
    task, as the train loop calls them: the run's last numbers, and nothing traced on the second eval."""
    workdir = str(dit_runs[0])
    config = train.load_config(workdir)
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    setup, model, step = train.restore_params(config, workdir, mesh)
    chosen = evaluators.from_config(config, setup.task)
    logged = {k: v for r in read_metrics(workdir) if r["step"] == step for k, v in r.items() if k.startswith("eval/")}
    with sharding.use_mesh(mesh, setup.rules), jax_traces() as traced:
        first = evaluators.run(chosen, model, mesh=mesh, step=step, workdir=None)
        assert traced
        del traced[:]
        again = evaluators.run(chosen, nnx.merge(*nnx.split(model)), mesh=mesh, step=step, workdir=None)
    assert traced == [] and again == first
    assert first.keys() == logged.keys() and "eval/gen_fd" in first
    for key in logged:
        assert first[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key


def test_sharded_train_step_equals_one_device(cache):
    """8 devices: batch over data x fsdp = 4, heads and mlp over tensor = 2."""
    def one_step(config, devices):
        mesh = sharding.create_mesh(config.mesh, devices)
        setup = train.build(config, mesh)
        rng = np.random.default_rng(0)
        shape = tuple(cache["info"]["shape"])
        batch = {"latents": rng.standard_normal((config.batch_size, *shape)).astype(np.float32),
                 "tokens": rng.integers(4, 128, (config.batch_size, config.data.max_text_len)).astype(np.int32)}
        with sharding.use_mesh(mesh, setup.rules):
            state = setup.init.lower().compile()()
            batch = sharding.global_batch(batch, mesh)
            state, metrics = setup.train_step.lower(state, batch).compile()(state, batch)
        return jax.device_get(metrics), jax.device_get(state["params"])

    reference, ref_params = one_step(small_dit_config(cache, data=1, fsdp=1, tensor=1), jax.devices()[:1])
    metrics, params = one_step(small_dit_config(cache, data=2, fsdp=2, tensor=2), jax.devices())
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(metrics[key], reference[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("task.p_uncond", 1.0, "config.task.p_uncond=1.0 must be in [0, 1)"),
    ("task.weighting", "cubic", "config.task.weighting='cubic' is unknown"),
    ("model.dit.width", 33, "config.model.dit.width=33 is not divisible by num_heads=2"),
    ("data.name", "nothing_here", "config.data.name='nothing_here'"),
])
def test_config_errors_are_one_line(cache, key, value, message):
    config = small_dit_config(cache)
    section, name = key.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        diffusion.Task(config).latent_info  # (read when the model is built)
    assert "\n" not in str(e.value)
