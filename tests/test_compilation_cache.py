"""vlm/compilation_cache.py: the persistent compilation cache is on by default, in the documented folder,
hit by a second process, and off when $JAX_COMPILATION_CACHE_DIR is set empty."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Configures the cache as `vlm` commands do, compiles one program, prints (folder, cache hit?, result).
PROGRAM = """
import jax, jax.numpy as jnp
from jax._src import monitoring
from vlm import compilation_cache
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
folder = compilation_cache.configure(default=DEFAULT)
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.arange(12.0).reshape(3, 4))
print(folder, bool(hits), y.tolist())
"""


def run(env: dict, default: bool = True) -> tuple[str, bool, str]:
    env = dict(env, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache even this small program
    env.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)  # tests/conftest.py's; configure() sets its own
    program = f"DEFAULT = {default}\n{PROGRAM}"
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder, hit, result = proc.stdout.strip().split(" ", 2)
    return folder, hit == "True", result


def test_default_folder_is_written_then_hit_with_the_same_result(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["VLM_CACHE_DIR"] = str(tmp_path / "vlm_cache")
    folder, hit, first = run(env)
    assert folder == str(tmp_path / "vlm_cache" / "jax")
    assert not hit
    entries = [name for name in os.listdir(folder) if name.startswith("jit__lambda-") and name.endswith("-cache")]
    assert len(entries) == 1, os.listdir(folder)
    assert os.path.exists(os.path.join(folder, ".lockfile"))  # MAX_BYTES set: JAX's LRU eviction and file lock
    folder, hit, second = run(env)
    assert hit, "a second process did not hit the cache"
    assert second == first


def test_no_default_folder_when_not_asked(tmp_path):
    """vlm/main.py asks for no default folder in a job of several processes (JAX writes from process 0 only)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["VLM_CACHE_DIR"] = str(tmp_path / "vlm_cache")
    folder, hit, _ = run(env, default=False)
    assert folder == "None" and not hit
    assert not (tmp_path / "vlm_cache").exists()


def test_empty_variable_turns_it_off(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="", VLM_CACHE_DIR=str(tmp_path / "vlm_cache"))
    folder, hit, _ = run(env)
    assert folder == "None" and not hit
    assert not (tmp_path / "vlm_cache").exists()


def test_a_named_folder_is_used_as_is(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"), VLM_CACHE_DIR=str(tmp_path / "vlm_cache"))
    folder, _, _ = run(env)
    assert folder == str(tmp_path / "mine")
    assert any(name.startswith("jit_") for name in os.listdir(tmp_path / "mine"))
    assert (tmp_path / "mine" / ".lockfile").exists()  # a named local folder gets the size limit too
    assert not (tmp_path / "vlm_cache").exists()
