"""Bad configs fail with one clear line, before anything compiles."""

import os
import subprocess
import sys
import time

import pytest

from configs import dual_encoder
from tests.helpers import small_config
from vlm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, devices=8, timeout=120):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlm.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.batch_sise=16"], "unknown config key --config.batch_sise; did you mean batch_size"),
        (["--config.model.vidoe.width=8"], "unknown config key --config.model.vidoe.width"),
        (["--config.mesh.data=3"], "config.mesh data=3*fsdp=1*context=1*tensor=1 needs 3 devices but 8 are available"),
        (["--config.batch_size=12"], "config.batch_size=12 (microbatch 12) does not divide over the batch axes data*fsdp=8"),
        (["--config.optim.lr=fast"], "flag --config.optim.lr=fast: could not convert string to float"),
        # 4 attention heads cannot be split 8 ways: caught on abstract shapes, before compiling.
        (["--config.mesh.data=1", "--config.mesh.tensor=8"], "does not split over mesh axes tensor=8"),
    ],
)
def test_cli_bad_config_is_one_line(tmp_path, args, expected):
    proc, _ = run_cli("train", "--config=configs/dual_encoder.py:tiny", f"--workdir={tmp_path}/w", *args)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("W1", "I1", "WARNING"))]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    # Nothing was built: no checkpoint, no metrics.
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_cli_unknown_variant_and_missing_file(tmp_path):
    proc, _ = run_cli("train", "--config=configs/dual_encoder.py:huge", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown variant 'huge' of configs/dual_encoder.py; choose one of: tiny, B/16, L/14"
    proc, _ = run_cli("train", "--config=configs/missing.py", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "No such file" in proc.stderr


def test_errors_come_before_compilation():
    """validate() needs no model and no devices: it is a pure function of the config."""
    c = small_config()
    c.batch_size = 20
    start = time.perf_counter()
    with pytest.raises(config_lib.ConfigError, match=r"config.batch_size=20 .* multiple of 8"):
        config_lib.validate(c, num_devices=8)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.mesh.update(dict(data=-1, fsdp=-1)), "at most one axis may be -1"),
        (lambda c: c.mesh.update(dict(data=3, fsdp=-1)), "does not divide the 8 devices"),
        (lambda c: setattr(c, "microbatches", 3), "config.microbatches=3 must be ≥ 1 and divide config.batch_size=16"),
        (lambda c: setattr(c, "eval_batch_size", 12), "config.eval_batch_size=12 does not divide over data*fsdp=8"),
        (lambda c: c.data.update(dict(vocab_size=100)), "config.data.vocab_size=100 differs from config.model.text.vocab_size"),
        (lambda c: c.data.update(dict(resolution=20)), "config.data.resolution=20 is not divisible by the patch size 8x8"),
        (lambda c: c.model.update(dict(remat="most")), "config.model.remat='most' is unknown"),
        (lambda c: c.task.update(dict(loss="hinge")), "config.task.loss='hinge' is unknown"),
        (lambda c: c.task.update(dict(name="magic")), "config.task.name='magic' is not a known task"),
        (lambda c: setattr(c, "total_steps", 0), "config.total_steps=0 must be a positive integer"),
    ],
)
def test_validate_messages(mutate, message):
    c = small_config()
    mutate(c)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, num_devices=8)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_config_is_locked_and_variants_exist():
    c = dual_encoder.get_config("tiny")
    for key in config_lib.REQUIRED_KEYS:
        assert key in c
    with pytest.raises(AttributeError):
        c.batch_sise = 3  # locked: a misspelt key cannot be added
    for variant in dual_encoder.VARIANTS:
        config_lib.validate(dual_encoder.get_config(variant), num_devices=8)
    big = dual_encoder.get_config("L/14")
    assert (big.model.video.width, big.model.video.depth, big.model.video.tubelet[1]) == (1024, 24, 14)
