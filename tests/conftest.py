"""Test setup: 8 virtual CPU devices, set before JAX is imported anywhere."""
import os
import tempfile

# XLA:CPU compiles without LLVM's optimisation passes and with its loop emitters: compiling is most of a test's
# time (tests/helpers.py, FAST_COMPILE_FLAG, the same flags).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The `vlm` processes tests start keep glibc's malloc defaults: its tuning (vlm/host_memory.py) speeds up
# long runs' steps but slows the multi-threaded XLA compile that dominates these short runs by ~10 %
# (measured: 46.5-48.5 s vs 41.9-44.5 s for test_train's fixture). tests/test_host_memory.py tests it.
os.environ.setdefault("VLM_HOST_MALLOC", "system")
# Each test session (each pytest-xdist worker) builds the synthetic set and tokenizer in its own data
# dir: workers never write one folder at once, and ~/.cache stays untouched.
if "VLM_DATA_DIR" not in os.environ:
    os.environ["VLM_DATA_DIR"] = tempfile.mkdtemp(prefix="vlm_test_data_")
# JAX's persistent compilation cache, one per test session, inherited by every `vlm` subprocess a test starts:
# most of a subprocess run's time is compiling the same tiny programs again (a 4-step tiny run: 62 s cold, 24 s
# warm). A cached executable is the same program, so results stay bit-identical. A max size turns on JAX's file
# lock, so two pytest-xdist workers never read an entry while the other writes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlm_test_jax_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory):
    """One tiny in-process run shared by several test files: fsdp=8, EMA on, two evaluators
    (every 2 and every 5 steps), 10 steps, checkpoints at 5 and 10, steps 7-8 profiled (tests/test_profiling.py).
    Returns (workdir, config)."""
    from tests.helpers import small_config
    from vlm import train

    tmp = tmp_path_factory.mktemp("ema_run")
    config = small_config(data=1, fsdp=8, tensor=1)
    config.total_steps = 10
    config.log_every = 1
    config.checkpoint_every = 5
    config.eval_every = 1000
    config.data.data_dir = str(tmp / "data")
    config.data.eval_size = 32
    config.ema.decay = 0.5
    config.profile = dict(steps=2, after_step=6)  # between the evals after steps 6 and 8
    with config.unlocked():
        config.evals = dict(fast=dict(type="retrieval", every=2), slow=dict(type="retrieval", every=5, prefix="slow/"))
    workdir = tmp / "w"
    train.train(config, str(workdir))
    return workdir, config
