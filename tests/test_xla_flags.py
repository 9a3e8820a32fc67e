"""config.xla_flags: checked before anything starts, merged into XLA_FLAGS before the backend, refused in one line."""

import os
import subprocess
import sys

import pytest

from vlm import config as config_lib
from vlm import xla_flags
from vlm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_accepts_platform_tuples_and_refuses_bad_entries():
    flags = {"gpu": ("--xla_gpu_enable_latency_hiding_scheduler=true",), "cpu": "--xla_cpu_enable_fast_math=false"}
    assert xla_flags.check(flags) == {"gpu": ("--xla_gpu_enable_latency_hiding_scheduler=true",),
                                      "cpu": ("--xla_cpu_enable_fast_math=false",)}
    with pytest.raises(ConfigError, match=r"platform 'cuda'; use cpu, gpu, tpu"):
        xla_flags.check({"cuda": ()})
    with pytest.raises(ConfigError, match=r"config.xla_flags.gpu has 'xla_gpu_foo'; each flag is one"):
        xla_flags.check({"gpu": ("xla_gpu_foo",)})
    with pytest.raises(ConfigError, match=r"has '--xla_a=1 --xla_b=2'"):  # two flags in one string
        xla_flags.check({"tpu": ("--xla_a=1 --xla_b=2",)})


def test_bad_flags_fail_config_validation():
    from tests.helpers import small_config

    config = small_config()
    config.xla_flags.gpu = ("--not_xla=1",)
    with pytest.raises(ConfigError, match="config.xla_flags.gpu has '--not_xla=1'"):
        config_lib.validate(config, 8)


def test_environment_flags_win_and_the_rest_are_appended():
    value, added, kept = xla_flags.merge("--xla_force_host_platform_device_count=8",
                                         ("--xla_force_host_platform_device_count=3", "--xla_cpu_enable_fast_math=false"))
    assert value == "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"
    assert added == ["--xla_cpu_enable_fast_math=false"] and kept == ["xla_force_host_platform_device_count"]
    assert xla_flags.merge("", ("--xla_dump_to=",)) == ("--xla_dump_to=", ["--xla_dump_to="], [])
    # Applied once already (vlm train, then train.train): nothing to add, nothing to say.
    assert xla_flags.merge(value, ("--xla_cpu_enable_fast_math=false",)) == (value, [], [])


def test_platform_follows_jax_platforms(monkeypatch):
    for requested, expected in (("cuda", "gpu"), ("tpu,cpu", "tpu"), ("cpu", "cpu"), ("rocm", "gpu")):
        monkeypatch.setenv("JAX_PLATFORMS", requested)
        assert xla_flags.platform() == expected


def test_platform_without_jax_platforms_follows_the_installed_plugins(monkeypatch, tmp_path):
    import jax

    jax.devices()  # JAX's own plugin discovery has run: it never sees the fake plugin below
    if "jax_plugins" not in sys.modules:  # the namespace package this test imports goes away with it
        monkeypatch.setitem(sys.modules, "jax_plugins", None)
        monkeypatch.delitem(sys.modules, "jax_plugins")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert xla_flags.platform() == "cpu"  # `pip install -e .[test]` brings no TPU or GPU plugin
    plugin = tmp_path / "jax_plugins" / "xla_cuda13"  # where jax-cuda13-plugin puts its entry point
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert xla_flags.platform() == "gpu"


def test_after_the_backend_started_flags_are_not_applied_and_said_so(monkeypatch):
    import jax

    jax.devices()  # this test process's backend is up (8 CPU devices)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    before = os.environ["XLA_FLAGS"]
    lines = []
    assert xla_flags.apply({"cpu": ("--xla_cpu_enable_fast_math=false",)}, log=lines.append) == []
    assert os.environ["XLA_FLAGS"] == before
    assert len(lines) == 1 and lines[0].startswith("config.xla_flags not applied: JAX's backend started before them")


def test_an_unknown_flag_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        xla_flags._try_in_subprocess("--xla_gpu_no_such_flag_anywhere=true")
    assert "\n" not in str(e.value)
    assert "Unknown flag in XLA_FLAGS: --xla_gpu_no_such_flag_anywhere=true" in str(e.value)


def _fresh_process(environment_flags: str | None) -> subprocess.CompletedProcess:
    """A new Python that applies a CPU flag from a config before touching JAX, then counts devices."""
    code = ("from vlm import xla_flags\n"
            "xla_flags.apply({'cpu': ('--xla_force_host_platform_device_count=3',), 'gpu': ('--xla_gpu_x=1',)})\n"
            "import jax; print('devices', jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    if environment_flags is not None:
        env["XLA_FLAGS"] = environment_flags
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_fresh_process_gets_the_platforms_flags_before_the_backend_starts():
    result = _fresh_process(None)
    assert result.returncode == 0, result.stderr[-2000:]
    # Only the CPU entry (the GPU one names no real flag: applying it would have aborted the process).
    assert "XLA_FLAGS += --xla_force_host_platform_device_count=3 (config.xla_flags, cpu)" in result.stdout
    assert "devices 3" in result.stdout


def test_a_flag_already_in_the_environment_keeps_its_value():
    result = _fresh_process("--xla_force_host_platform_device_count=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "XLA_FLAGS from the environment keep their values for xla_force_host_platform_device_count" in result.stdout
    assert "devices 2" in result.stdout


def test_vlm_train_refuses_an_unknown_flag_in_one_line_before_writing_anything(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "vlm.main", "train", "--config=configs/dual_encoder.py:tiny",
                             f"--workdir={tmp_path / 'w'}", "--config.xla_flags.cpu=('--xla_cpu_no_such_flag=1',)"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.lower().startswith("error:")]
    assert [l[len("error: "):] for l in errors] == ["config.xla_flags: XLA refuses them (Unknown flag in XLA_FLAGS: --xla_cpu_no_such_flag=1); "
                      "fix or remove the flag (`XLA_FLAGS=--help python -c 'import jax; jax.devices()'` lists this "
                      "jaxlib's flags)"]
    assert not (tmp_path / "w").exists()
