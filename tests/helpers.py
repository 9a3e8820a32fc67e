"""Small configs and batches shared by the tests."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from configs import dual_encoder


def small_config(**mesh):
    """The tiny dual encoder shrunk further so a train step compiles and runs in seconds."""
    c = dual_encoder.get_config("tiny")
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = 10
    c.optim.warmup_steps = 0  # the first step must move the parameters
    # Plain AdamW: tiny's temperature multiplier names the dual encoder's `logit_scale`, which toy tasks
    # built on this config lack, and tests read the unpartitioned optimizer state (test_freezing tests it).
    c.optim.lr_multipliers = ()
    c.optim.lr = 1e-3  # the tests' small shapes and their measured thresholds were set at this lr (tiny: 8.5e-4)
    c.optim.grad_clip_norm = 1.0  # ... and with clipping (tiny clips nothing since stop 27)
    c.model.embed_dim = 32
    c.model.video.update(dict(tubelet=(2, 8, 8), width=32, depth=1, num_heads=2, mlp_dim=64))
    c.model.text.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    c.data.update(dict(num_frames=4, resolution=16, max_text_len=8))
    if mesh:
        c.mesh.update(mesh)
    return c


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic fake global batch with the data pipeline's shapes and dtypes."""
    rng = np.random.default_rng(seed)
    d = config.data
    b = config.batch_size
    tokens = rng.integers(4, d.vocab_size, (b, d.max_text_len)).astype(np.int32)
    lengths = rng.integers(3, d.max_text_len + 1, b)
    tokens[np.arange(d.max_text_len)[None, :] >= lengths[:, None]] = 0  # right padding
    return {
        "video": rng.integers(0, 256, (b, d.num_frames, d.resolution, d.resolution, 3), dtype=np.uint8),
        "tokens": tokens,
    }


@contextlib.contextmanager
def jax_traces():
    """What JAX traces or compiles inside the block, as a list of "trace NAME" / "compile NAME" (a jit cache miss
    traces; a retrace or a new input sharding compiles)."""
    names = []
    kinds = {"/jax/core/compile/jaxpr_trace_duration": "trace", "/jax/core/compile/backend_compile_duration": "compile"}

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in kinds:
            names.append(f"{kinds[event]} {kwargs.get('fun_name', '?')}")

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# The same shrinking as small_config(), as command-line overrides of configs/dual_encoder.py:tiny.
SMALL_OVERRIDES = (
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
    "--config.optim.warmup_steps=0",
    "--config.optim.lr_multipliers=()",
    "--config.optim.grad_clip_norm=1.0",
    "--config.model.embed_dim=32",
    "--config.model.video.width=32",
    "--config.model.video.depth=1",
    "--config.model.video.num_heads=2",
    "--config.model.video.mlp_dim=64",
    "--config.model.text.width=32",
    "--config.model.text.depth=1",
    "--config.model.text.num_heads=2",
    "--config.model.text.mlp_dim=64",
    "--config.data.num_frames=4",
    "--config.data.resolution=16",
    "--config.data.max_text_len=8",
)


# XLA:CPU without LLVM's optimisation passes and with its classic loop emitters instead of the MLIR fusion
# emitters: the tests' programs are tiny and compiling is most of their time (a small_config train step: 31 s to
# compile by default, 16 s at level 0; on 8 devices with fsdp=8, benchmarks/throughput.py's "compiled in" is
# 8.6-9.4 s at level 0 and 5.2 s with both, with the same loss; 0.07 s to run). tests/conftest.py sets it for the test process, run_vlm for the processes it starts;
# learning tests, whose time is running, pass optimize=True (at full optimisation the loop emitters compile the
# tiny train step slower: 59.5 s vs 34.4 s, benchmarks/README.md).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def run_vlm(*args, devices: int = 1, timeout: int = 300, env_extra=None, optimize: bool = False):
    """Runs `python -m vlm.main ARGS` in a fresh process with `devices` CPU devices (`env_extra`: variables to set,
    or with None, to unset)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = f"--xla_force_host_platform_device_count={devices}" + ("" if optimize else f" {FAST_COMPILE_FLAG}")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env.update(env_extra or {})
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "vlm.main", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def multiprocess_env() -> dict:
    """The environment for a job of several `vlm` processes (launch/local.py replaces the device count in
    XLA_FLAGS), with the persistent compilation cache off (tests/conftest.py; an empty value, so vlm's default
    folder is not used either): JAX writes cache entries from process 0 only, so on a warm cache process 0
    skips its compiles while the others compile, and under load they miss the 30 s deadline of gloo's
    start-up handshake."""
    import os

    return dict(os.environ, JAX_COMPILATION_CACHE_DIR="")


def read_metrics(workdir) -> list[dict]:
    import json
    import os

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_checkpoint_params(workdir, step, item="params"):
    """A checkpoint's parameters (or another item, e.g. "ema") as host arrays, whatever topology saved them."""
    import os

    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), item)
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.device_get(checkpointer.restore(path, target))
