"""Training throughput of a config on random in-memory batches: the model and the step, no input pipeline.

    python benchmarks/throughput.py --config=configs/dual_encoder.py:tiny --steps=3
    python benchmarks/throughput.py --config=configs/dual_encoder.py:B/16 --steps=10 --dtype=bfloat16 \\
        --sweep=b32:batch_size=32,remat=full --sweep=b64:batch_size=64,remat=full \\
        --sweep=b64_noremat:batch_size=64,remat=none \\
        --sweep=tiny_f32:config=configs/dual_encoder.py:tiny,batch_size=128,dtype=float32 --isolate
    python benchmarks/throughput.py --config=configs/dit_video.py:1.3B --latents=9,32,32,16 --batch_size=8 --steps=5

Each row: build the mesh and the jitted step exactly as `vlm train` does (`train.build`), create the
state, place one random uint8 video / int32 token batch of the config's shapes, compile the step
(timed), run `--warmup` steps, then time `--steps` steps with one `block_until_ready` around the loop.
A DiT config trains on a latent cache: `--latents=t,h,w,c` (or `latents=(t,h,w,c)` in a row) gives its shape,
and random float32 latents of that shape stand in for the cache (no VAE, no `vlm data encode` needed).

Overrides, applied in this order on top of the config file's `get_config(variant)`:
  --batch_size / --dtype / --remat, then --set key=value and --config.key=value (repeatable),
  then the row's own `key=value` list. Keys are dotted config paths (`model.video.depth=2`);
  the aliases dtype → model.dtype, remat → model.remat, and config=PATH:VARIANT (a row may load
  another config file) are understood. Values are Python literals, else strings.

`--sweep=NAME:k=v,k=v` (repeatable) measures several rows in one process (or, with --isolate, one
fresh subprocess per row, so that each row's peak memory is its own and an out-of-memory row cannot
disturb the next). A failing row is reported in the table and the sweep goes on.

The Markdown table is printed at the end and written to --out (default $OUT/throughput.md when
the environment variable OUT is set), with the raw numbers beside it as throughput.json.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from vlm import config as config_lib  # noqa: E402
from vlm import metrics as metrics_lib  # noqa: E402
from flax import nnx  # noqa: E402

from vlm import flops, host_memory, sharding, train, xla_flags  # noqa: E402

ALIASES = {"dtype": "model.dtype", "remat": "model.remat"}
RESULT_MARK = "THROUGHPUT_RESULT "
GiB = 1024**3


# ----------------------------------------------------------------------------- config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/dual_encoder.py:B/16' → that file's get_config('B/16'), locked against new keys."""
    path, _, arg = spec.partition(":")
    full = path if os.path.exists(path) else os.path.join(ROOT, path)  # relative to cwd, else to the repo
    if not os.path.exists(full):
        raise FileNotFoundError(f"config file {path!r} not found (give e.g. configs/dual_encoder.py:tiny)")
    name = "_throughput_config_" + os.path.splitext(os.path.basename(full))[0]
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    key = ALIASES.get(key, key)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise ValueError(f"config has no key {key!r} (no {part!r})")
        node = node[part]
    if leaf not in node:
        raise ValueError(f"config has no key {key!r}")
    value = parse_value(text)
    if isinstance(node[leaf], float) and isinstance(value, int):
        value = float(value)
    node[leaf] = value


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Splits on `sep` outside brackets and quotes: 'a=1,b=(2,16,16)' → ['a=1', 'b=(2,16,16)']."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def parse_pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"override {item!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    return pairs


@dataclasses.dataclass
class Row:
    """One measurement: a config file spec plus overrides, in order."""

    name: str
    config: str
    overrides: list[tuple[str, str]]
    steps: int
    warmup: int
    flops_only: bool = False
    compile_only: bool = False
    latents: str | None = None  # "t,h,w,c" of the latent cache a DiT config trains on (random latents here)


def build_rows(args, extra_overrides: list[tuple[str, str]]) -> list[Row]:
    base = []
    if args.batch_size is not None:
        base.append(("batch_size", str(args.batch_size)))
    if args.dtype is not None:
        base.append(("model.dtype", repr(args.dtype)))
    if args.remat is not None:
        base.append(("model.remat", repr(args.remat)))
    base += parse_pairs(args.set or []) + extra_overrides
    specs = args.sweep or [""]
    rows = []
    for spec in specs:
        name, colon, rest = spec.partition(":")
        if not colon or "=" in name:  # no name given: the overrides are the name
            name, rest = spec, spec
        pairs = parse_pairs(split_top_level(rest)) if rest else []
        config, latents = args.config, args.latents
        for key, value in pairs:
            if key == "config":
                config = value
            elif key == "latents":
                latents = value
        pairs = [(k, v) for k, v in pairs if k not in ("config", "latents")]
        name = name or args.config.partition(":")[2] or "default"
        rows.append(Row(name, config, base + pairs, args.steps, args.warmup, args.flops_only, args.compile_only,
                        latents))
    return rows


def parse_latents(text) -> list[int] | None:
    """"9,32,32,16" or "(9,32,32,16)" → [9, 32, 32, 16]; None/"" → None."""
    if not text:
        return None
    values = [int(v) for v in str(text).strip("()[] ").split(",") if v.strip()]
    if len(values) != 4 or min(values) < 1:
        raise ValueError(f"latents={text!r} must be four positive integers t,h,w,c")
    return values


def trains_on_latents(config) -> bool:
    return (config.get("task") or {}).get("name") == "diffusion"


def use_random_latents(config, latents: list[int] | None) -> None:
    """A DiT config reads its latent cache's shape and per-channel statistics (input_pipeline.latents.latent_info);
    here there is no cache: `latents` stands in, with mean 0 and std 1 (the step's cost does not depend on them)."""
    if latents is None:
        raise ValueError(f"{config.data.name!r} is a latent cache: give its shape, e.g. --latents=9,32,32,16 (33 frames "
                         "of 256x256 through a 4x8x8, 16-channel VAE like Wan 2.1's) or latents=(t,h,w,c) in a --sweep row")
    from input_pipeline import latents as latents_lib

    info = {"shape": list(latents), "mean": [0.0] * latents[-1], "std": [1.0] * latents[-1],
            "vae_hash": str((config.get("task") or {}).get("vae_hash", "")),  # passes the task's hash check
            "source": "benchmarks/throughput.py (random latents)"}
    latents_lib.latent_info = lambda name, data_dir: info  # this benchmark process only


def row_config(row: Row) -> ml_collections.ConfigDict:
    config = load_config(row.config)
    for key, value in row.overrides:
        apply_override(config, key, value)
    return config


# ----------------------------------------------------------------------------- measurement


def random_batch(config, num_rows: int, seed: int = 0, latents: list[int] | None = None) -> dict[str, np.ndarray]:
    """Right-padded int32 tokens [B, L] and uint8 video [B, T, H, W, 3] of the config's data shapes, or, given
    `latents` [t, h, w, c], float32 latents [B, t, h, w, c] instead of the video (a DiT's batch)."""
    rng = np.random.default_rng(seed)
    d = config.data
    tokens = rng.integers(4, d.vocab_size, (num_rows, d.max_text_len)).astype(np.int32)
    lengths = rng.integers(min(3, d.max_text_len), d.max_text_len + 1, num_rows)
    tokens[np.arange(d.max_text_len)[None, :] >= lengths[:, None]] = 0  # padding id 0
    if latents is not None:
        return {"latents": rng.standard_normal((num_rows, *latents), np.float32), "tokens": tokens}
    video = rng.integers(0, 256, (num_rows, d.num_frames, d.resolution, d.resolution, 3), dtype=np.uint8)
    return {"video": video, "tokens": tokens}


def compiled_bytes(compiled) -> int | None:
    """XLA's own per-device estimate: arguments + outputs - donated aliases + temporaries."""
    try:
        ma = compiled.memory_analysis()
        ma = ma[0] if isinstance(ma, (list, tuple)) else ma
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - best effort
        return None


def one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def model_flops(setup: train.Setup, batch: dict[str, Any]) -> tuple[float | None, str]:
    """(model FLOPs per step, how they were counted): the trainer's own count (see its docstring)."""
    count = flops.model_flops_per_step(setup, batch)
    return (count, "lowered-cpu") if count else (None, "n/a")


def measure(row: Row) -> dict[str, Any]:
    """Builds, compiles and times one row. Never raises: errors go into result['error']."""
    result: dict[str, Any] = {"name": row.name, "config": row.config}
    phase = "config"
    peak_before = None
    try:
        config = row_config(row)
        # The row's config.xla_flags, as `vlm train` sets them: only before this process's backend starts (each
        # --isolate row is a fresh process; in one process, rows after the first say so if theirs differ).
        xla_flags.apply(config.get("xla_flags") or {}, log=lambda line: _log(row.name, line))
        peak_before = metrics_lib.peak_memory_bytes()
        result.update(
            batch=int(config.batch_size), dtype=str(config.model.dtype), remat=str(config.model.remat),
            attention=str(config.model.get("attention_impl", "xla")), microbatches=int(config.get("microbatches", 1)),
        )
        latents = None
        if trains_on_latents(config):
            latents = parse_latents(row.latents)
            use_random_latents(config, latents)
            result["latents"] = "x".join(map(str, latents))
        config_lib.validate(config, jax.device_count())
        phase = "build"
        mesh = sharding.create_mesh(config.mesh)
        result["mesh"] = "x".join(f"{mesh.shape[a]}" for a in sharding.MESH_AXES)
        setup = train.build(config, mesh)
        if row.flops_only or row.compile_only:
            phase = "flops"
            one = random_batch(config, 1, latents=latents)
            shapes = {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype) for k, v in one.items()}
            result["flops_per_step"], result["flops_source"] = model_flops(setup, shapes)
            if row.compile_only:  # ahead of time, from shapes (MaxText's train_compile): nothing is allocated
                phase = "compile"
                with sharding.use_mesh(mesh, setup.rules):
                    t = time.perf_counter()
                    lowered = setup.train_step.lower(setup.abstract_state, shapes)
                    result["lower_s"] = time.perf_counter() - t
                    compiled = lowered.compile()
                result["compile_s"] = time.perf_counter() - t
                result["xla_bytes"] = compiled_bytes(compiled)
                _log(row.name, f"lowered in {result['lower_s']:.1f}s, lowered + compiled in {result['compile_s']:.1f}s")
            return result
        local = random_batch(config, config.batch_size // jax.process_count(), seed=jax.process_index(), latents=latents)
        with sharding.use_mesh(mesh, setup.rules):
            phase = "init"
            t = time.perf_counter()
            state = jax.block_until_ready(setup.init())
            result["init_s"] = time.perf_counter() - t
            batch = sharding.global_batch(local, mesh)
            phase = "flops"
            result["flops_per_step"], result["flops_source"] = model_flops(setup, batch)
            phase = "compile"
            t = time.perf_counter()
            step_fn = setup.train_step.lower(state, batch).compile()
            result["compile_s"] = time.perf_counter() - t
            result["xla_bytes"] = compiled_bytes(step_fn)
            _log(row.name, f"compiled in {result['compile_s']:.1f}s")
            phase = "warm-up"
            metrics = None
            for _ in range(row.warmup):
                state, metrics = step_fn(state, batch)
            jax.block_until_ready((state, metrics))
            phase = "timed steps"
            t = time.perf_counter()
            for _ in range(row.steps):
                state, metrics = step_fn(state, batch)
            jax.block_until_ready((state, metrics))
            elapsed = time.perf_counter() - t
            loss = float(jax.device_get(metrics["train/loss"])) if metrics is not None else float("nan")
        step_s = elapsed / max(row.steps, 1)
        result.update(step_s=step_s, steps_per_s=1.0 / step_s, examples_per_s=config.batch_size / step_s, loss=loss)
        flops = result["flops_per_step"]
        if flops:
            result["tflops_per_device"] = flops / step_s / jax.device_count() / 1e12
            peak = metrics_lib.peak_flops_per_device()
            result["mfu"] = result["tflops_per_device"] * 1e12 / peak if peak else None
        if not math.isfinite(loss):
            result["error"] = f"loss is {loss}"
        _log(row.name, f"{1e3 * step_s:.1f} ms/step, loss {loss:.4g}")
    except Exception as e:  # noqa: BLE001 - one failing row must not stop the sweep
        result["error"] = f"{phase}: {one_line(e)}"
        _log(row.name, f"FAILED in {phase}:\n{traceback.format_exc()}")
    finally:
        state = batch = step_fn = setup = metrics = None  # noqa: F841 - free device memory for the next row
        gc.collect()
        jax.clear_caches()
    peak_after = metrics_lib.peak_memory_bytes()
    if peak_after is not None:
        result["peak_bytes"] = peak_after
        # Peak is a process-wide high-water mark: a row below an earlier row's peak only knows "≤".
        result["peak_exact"] = peak_before is None or peak_after > peak_before or peak_before == 0
    return result


def measure_isolated(row: Row, timeout_s: float | None) -> dict[str, Any]:
    """Runs `measure(row)` in a fresh Python process (own device memory, own peak counter)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child=" + json.dumps(dataclasses.asdict(row))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=os.getcwd())
    except subprocess.TimeoutExpired as e:
        sys.stderr.write(_text(e.stderr))
        return {"name": row.name, "config": row.config, "error": f"timed out after {timeout_s:.0f}s"}
    sys.stderr.write(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = tail[-1].strip()[:200] if tail else "no output"
    return {"name": row.name, "config": row.config, "error": f"process exited with {proc.returncode}: {reason}"}


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _log(name: str, message: str) -> None:
    from jax._src import xla_bridge

    # Asking the process index starts the backend: not before the row's config.xla_flags are set.
    if not xla_bridge.backends_are_initialized() or jax.process_index() == 0:
        print(f"[throughput:{name}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- table


def _num(x, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / GiB:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    header = (
        "| row | config | mesh d×f×c×t | batch | dtype | remat | attention | step ms | steps/s | examples/s | TFLOP/step | FLOPs from "
        "| TFLOP/s/dev | MFU | peak GiB | XLA est. GiB | compile s | status |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        step_s = r.get("step_s")
        peak = r.get("peak_bytes")
        peak_text = _gib(peak) if r.get("peak_exact", True) else f"≤{_gib(peak)}"
        flops = r.get("flops_per_step")
        cells = [
            r["name"],
            r.get("config", ""),
            r.get("mesh", ""),
            str(r.get("batch", "")),
            r.get("dtype", ""),
            r.get("remat", ""),
            r.get("attention", ""),
            _num(None if step_s is None else 1e3 * step_s, ".1f"),
            _num(r.get("steps_per_s"), ".3g"),
            _num(r.get("examples_per_s"), ".1f"),
            _num(None if not flops else flops / 1e12, ".4g"),
            r.get("flops_source", "n/a"),
            _num(r.get("tflops_per_device"), ".4g"),
            _num(None if r.get("mfu") is None else 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") is not None else ""),
            peak_text,
            _gib(r.get("xla_bytes")),
            _num(r.get("compile_s"), ".1f"),
            ("FAILED " + r["error"]) if r.get("error") else ("compiled only" if r.get("compile_s") is not None else "flops only") if r.get("step_s") is None else "ok",
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def environment() -> str:
    import flax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"devices: {len(devices)}× {', '.join(kinds)} ({devices[0].platform}), {jax.process_count()} process(es); "
        f"jax {jax.__version__}, flax {flax.__version__}"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/dual_encoder.py:tiny", help="PATH:VARIANT of a get_config file")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    p.add_argument("--batch_size", type=int, default=None, help="global batch size override")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="model compute dtype")
    p.add_argument("--remat", default=None, help="remat policy: none | full | dots | dots_no_batch")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--sweep", action="append", metavar="NAME:K=V,K=V", help="one table row (repeatable)")
    p.add_argument("--flops_only", action="store_true", help="only count model FLOPs (no state, no steps)")
    p.add_argument("--compile_only", action="store_true",
                   help="count FLOPs and compile the train step from shapes (no state, no steps): compile time, XLA's memory")
    p.add_argument("--latents", default=None, metavar="T,H,W,C",
                   help="DiT configs: the latent shape to train on (random latents stand in for the latent cache)")
    p.add_argument("--isolate", action="store_true", help="run each row in its own subprocess")
    p.add_argument("--row_timeout", type=float, default=None, help="with --isolate: seconds before a row is killed")
    p.add_argument("--out", default=None, help="Markdown output (default: $OUT/throughput.md if OUT is set)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args, unknown = p.parse_known_args(argv)
    extra, bad = [], []
    for item in unknown:  # --config.key=value, as `vlm train` takes them
        if item.startswith("--config.") and "=" in item:
            key, _, value = item[len("--config."):].partition("=")
            extra.append((key, value))
        else:
            bad.append(item)
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, extra


def main(argv: list[str]) -> int:
    host_memory.configure()  # as `vlm train` does, before the backend starts (vlm/host_memory.py)
    args, extra = parse_args(argv)
    if args._child:  # one isolated row: print its result for the parent
        row = Row(**json.loads(args._child))
        row.overrides = [tuple(kv) for kv in row.overrides]
        print(RESULT_MARK + json.dumps(measure(row)), flush=True)
        return 0

    rows = build_rows(args, extra)
    if not args.isolate:  # one process: only the first row's config.xla_flags can be set before the backend starts
        try:
            xla_flags.apply(row_config(rows[0]).get("xla_flags") or {}, log=lambda line: _log(rows[0].name, line))
        except Exception:  # noqa: BLE001 - a bad row reports its own one-line error in the table
            pass
    env = environment()
    print(env, file=sys.stderr, flush=True)
    note = f"{env}; {rows[0].warmup} warm-up + {rows[0].steps} timed steps per row; random in-memory batches"
    if not args.isolate and len(rows) > 1:
        note += "; peak memory is the process high-water mark (≤ where an earlier row set it)"
    out = args.out or (os.path.join(os.environ["OUT"], "throughput.md") if os.environ.get("OUT") else None)
    results = []
    for row in rows:
        _log(row.name, f"{row.config} {' '.join(f'{k}={v}' for k, v in row.overrides)}")
        results.append(measure_isolated(row, args.row_timeout) if args.isolate else measure(row))
        if out and jax.process_index() == 0:  # after every row, so a killed sweep still leaves its rows
            write_outputs(out, note, env, results)
    if jax.process_index() == 0:
        print(f"\n{note}\n\n{table(results)}\n", flush=True)
    return 1 if all(r.get("error") for r in results) else 0


def write_outputs(out: str, note: str, env: str, results: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"{note}\n\n{table(results)}\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"environment": env, "rows": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
