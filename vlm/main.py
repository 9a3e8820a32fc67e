"""The `vlm` command line.

  vlm train --config=configs/dual_encoder.py:tiny --workdir=W [--config.key=value ...]
  vlm eval --workdir=W [--step=N] [--evals=name,...] [--use_ema=false]
  vlm caption --workdir=W a.mp4 [b.mp4 ...] [--decode=greedy|beam|sample] [--beam_size=4] [--step=N]
  vlm tokenizer train --input=captions.txt --vocab_size=N --output=PREFIX
  vlm data build --manifest=manifest.jsonl --data_dir=DIR --name=NAME [--max_short_side=256 ...]
  vlm sample --workdir=W --prompt="..." --out=x.mp4 [--num_frames --steps --cfg --seed --sampler]
  vlm convert --from=HF_DIR --kind=clip|siglip --output=EXPORT_DIR [--num_frames=8 --tubelet_frames=2]
  vlm export --workdir=W --output=D [--step=N] [--dtype=bfloat16] [--format=safetensors|stablehlo]
  vlm embed --workdir=W|--export=D [--name=NAME --split=S --data_dir=DIR | --manifest=M] --output=O
  vlm retrieve --index=O --text="..." | --video=x.mp4 [--k=10]
  vlm reconstruct --workdir=W in.mp4 --out=out.mp4 [--num_frames=N --resolution=R]
  vlm data encode --vae_workdir=W --out_name=NAME_latents [--config=DATA_CONFIG | --dataset=NAME] [--max_examples=N]
  vlm profile --workdir=W   (after a run with --config.profile.steps=N: where those steps' time went)
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "eval", "caption", "sample", "tokenizer train", "data build", "data encode", "convert", "export",
            "embed", "retrieve", "reconstruct", "profile")

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dual_encoder.py:tiny", lock_config=True)
flags.DEFINE_string("workdir", None, "Where config.json, metrics, checkpoints and samples go.")
flags.DEFINE_integer("step", None, "eval: which checkpoint step (default: latest).")
flags.DEFINE_string("evals", None, "eval: comma-separated evaluator names from config.evals (default: all).")
flags.DEFINE_bool("use_ema", None, "eval: use the EMA weights when the run keeps them (default: true).")
flags.DEFINE_enum("decode", None, ["greedy", "beam", "sample"],
                  "caption: decoding method (default: beam with --beam_size, else the run's captions evaluator's).")
flags.DEFINE_integer("beam_size", None, "caption: beam width (implies --decode=beam unless --decode says otherwise).")
flags.DEFINE_integer("exit_after_step", None, "train: checkpoint and exit after this step (a preemption drill).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 (else auto: env, SLURM, TPU).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_string("input", None, "tokenizer train: text file, one caption per line.")
flags.DEFINE_integer("vocab_size", None, "tokenizer train: vocabulary size.")
flags.DEFINE_string("output", None, "tokenizer train: output prefix (writes PREFIX.model); convert: the export folder.")
flags.DEFINE_string("manifest", None, "data build: JSONL or CSV manifest of media paths and captions.")
flags.DEFINE_string("data_dir", None, "data build: where datasets live (writes DATA_DIR/NAME/VERSION).")
flags.DEFINE_string("name", None, "data build: the dataset's name (then --config.data.name=NAME).")
flags.DEFINE_integer("max_short_side", 0, "data build: re-encode so the shorter side is at most this (0 = keep).")
flags.DEFINE_float("max_fps", 0.0, "data build: re-encode to at most this frame rate (0 = keep).")
flags.DEFINE_float("max_duration", 0.0, "data build: re-encode, keeping at most this many seconds per clip (0 = all).")
flags.DEFINE_float("keyframe_interval", 1.0, "data build: seconds between keyframes when re-encoding.")
flags.DEFINE_integer("crf", 23, "data build: x264 CRF when re-encoding (lower = better and larger).")
flags.DEFINE_bool("reencode", False, "data build: re-encode every video, also within the limits (keyframe spacing).")
flags.DEFINE_bool("overwrite", False, "data build: replace an existing dataset of the same name and version.")
flags.DEFINE_bool("allow_outside", False, "data build: allow media paths outside the manifest's folder.")
flags.DEFINE_string("beam_pipeline_options", None,
                    "data build: build on Apache Beam, e.g. 'runner=DirectRunner,direct_num_workers=4'.")
flags.DEFINE_string("from", None, "convert: a Hugging Face checkpoint folder (config.json + model.safetensors).")
flags.DEFINE_enum("kind", None, ["clip", "siglip"], "convert: the checkpoint's model family.")
flags.DEFINE_integer("num_frames", 8, "convert: frames per clip the video tower is built for (temporal positions); "
                     "sample: frames to generate (1 + 4k; default: the latent cache's clips).")
flags.DEFINE_string("prompt", None, "sample: the text to generate a video for.")
flags.DEFINE_string("out", None, "sample, reconstruct: the output video (.mp4; sample also writes a .gif beside it).")
flags.DEFINE_integer("steps", 0, "sample: ODE steps (default: config.task.sample_steps).")
flags.DEFINE_float("cfg", None, "sample: classifier-free guidance scale (default: config.task.guidance).")
flags.DEFINE_integer("seed", 0, "sample: noise seed; data encode: seed of the samples (--latents=sample).")
flags.DEFINE_string("sampler", "", "sample: euler | heun (default: config.task.sampler).")
flags.DEFINE_integer("tubelet_frames", 2, "convert: frames per tubelet the image patch embedding is inflated over.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "export: the stored parameters' dtype.")
flags.DEFINE_enum("format", "safetensors", ["safetensors", "stablehlo"],
                  "export: safetensors (model.safetensors, config.json, tokenizer.model, README.md), or that plus "
                  "jax.export'ed embed_text/embed_video (stablehlo).")
flags.DEFINE_string("export", None, "embed: an export folder (`vlm export`) instead of --workdir.")
flags.DEFINE_string("split", None, "embed: the split to embed (default: the run's eval split; a manifest: all rows).")
flags.DEFINE_integer("batch_size", None, "embed: global rows per step (default: the run's eval_batch_size).")
flags.DEFINE_string("index", None, "retrieve: the --output folder of `vlm embed`.")
flags.DEFINE_string("text", None, "retrieve: a text query (searches the videos).")
flags.DEFINE_string("video", None, "retrieve: a video or image file as the query (searches the captions).")
flags.DEFINE_integer("k", 10, "retrieve: how many results.")
flags.DEFINE_integer("resolution", 0, "reconstruct: shorter side resized to this and a centre square crop (0 = native).")
flags.DEFINE_string("vae_workdir", None, "data encode: the video autoencoder run (configs/video_vae.py) that encodes.")
flags.DEFINE_string("dataset", None, "data encode: the source dataset's name (else --config's data, else the VAE run's).")
flags.DEFINE_string("out_name", None, "data encode: the latent dataset's name (then --config.data.name=NAME).")
flags.DEFINE_string("splits", None, "data encode: comma-separated splits (default: the train and eval splits).")
flags.DEFINE_integer("max_examples", 0, "data encode: at most this many clips per split (0 = all).")
flags.DEFINE_enum("latents", "posterior", ["posterior", "sample"],
                  "data encode: store the posterior (mean and std) or one sample z = mean + std * eps per clip.")
flags.DEFINE_integer("chunk_size", 256, "data encode: clips per work chunk (the unit of resuming and sharding).")
FLAGS = flags.FLAGS


def _fail(message: str, code: int = 2, *, now: bool = False) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if now:  # skip the interpreter's shutdown: threads still writing would print tracebacks from it
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _require(*names: str) -> None:
    missing = [n for n in names if FLAGS[n].value is None]
    if missing:
        usage = "; ".join(line.strip() for line in __doc__.strip().splitlines()[2:])
        _fail(f"missing --{missing[0]}; usage: {usage}")


def main(argv: list[str]) -> None:
    from vlm import host_memory

    host_memory.configure()  # before JAX's CPU backend starts (vlm/host_memory.py)
    from vlm.errors import ConfigError
    from vlm.errors import TrainingDiverged

    if not FLAGS["verbosity"].present:  # Orbax logs every file it renames at INFO; -v 0 brings it back
        logging.set_verbosity(logging.WARNING)
        # Orbax also logs a failed save or restore, with tracebacks, from each thread involved; the
        # failure reaches us as an exception and is reported as one line (-v 0 shows them).
        logging.get_absl_logger().addFilter(lambda record: record.levelno < 40 or  # 40: Python's ERROR
                                            "/orbax/" not in record.pathname.replace("\\", "/"))

    command = " ".join(argv[1:3]) if argv[1:2] in (["tokenizer"], ["data"]) else " ".join(argv[1:2])
    if command not in COMMANDS:
        _fail(f"unknown command {' '.join(argv[1:]) or '(none)'!r}; use one of: {', '.join(COMMANDS)}")
    try:
        mode = "single"
        if command == "train":
            _require("config", "workdir")
            try:
                config = FLAGS.config
                "seed" in config  # a config file that failed to load raises on first access
            except OSError as e:
                _fail(_one_line(e, argv).replace("config_config", "--config"))
            from vlm import xla_flags

            # XLA reads XLA_FLAGS once, when the backend starts: before the process count or the cache touch it.
            xla_flags.apply(config.get("xla_flags") or {}, log=lambda line: print(line, flush=True))
        if command in ("train", "eval", "embed", "data encode"):
            from vlm import distributed

            mode = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        if command not in ("tokenizer train", "data build", "profile"):  # the others compile
            import jax

            from vlm import compilation_cache

            # A default folder only for one process (a one-host TPU VM is mode "tpu"): JAX writes entries from
            # process 0 only (vlm/compilation_cache.py).
            compilation_cache.configure(default=mode == "single" or jax.process_count() == 1)
        if command == "train":
            from vlm import train

            train.train(config, FLAGS.workdir, exit_after_step=FLAGS.exit_after_step)
        elif command == "eval":
            _require("workdir")
            from vlm import train

            metrics = train.evaluate(FLAGS.workdir, step=FLAGS.step, evals=FLAGS.evals, use_ema=FLAGS.use_ema)
            print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        elif command == "caption":
            _require("workdir")
            from vlm.tasks import captioning

            try:
                captions = captioning.caption_files(FLAGS.workdir, argv[2:], decode=FLAGS.decode,
                                                    beam_size=FLAGS.beam_size, step=FLAGS.step, use_ema=FLAGS.use_ema)
            except ValueError as e:  # a file that does not decode, no files: one line
                _fail(str(e))
            print("\n".join(f"{path}\t{caption}" for path, caption in captions), flush=True)
        elif command == "data build":
            _require("manifest", "data_dir", "name")
            _data_build()
        elif command == "sample":
            _require("workdir", "prompt", "out")
            from vlm.tasks import diffusion

            print(diffusion.sample_to_file(
                FLAGS.workdir, FLAGS.prompt, FLAGS.out, num_frames=FLAGS.num_frames if FLAGS["num_frames"].present else 0,
                steps=FLAGS.steps, guidance=FLAGS.cfg, seed=FLAGS.seed, sampler=FLAGS.sampler), flush=True)
        elif command == "convert":
            _require("from", "kind", "output")
            from vlm import convert

            try:
                path = convert.convert(FLAGS["from"].value, FLAGS.kind, FLAGS.output, num_frames=FLAGS.num_frames,
                                       tubelet_frames=FLAGS.tubelet_frames)
            except convert.ConvertError as e:
                _fail(str(e))
            print(f"wrote {path} (model.safetensors, config.json)", flush=True)
        elif command in ("export", "embed", "retrieve"):
            _downstream(command)
        elif command in ("reconstruct", "data encode"):
            _autoencoder(command, argv)
        elif command == "profile":
            _require("workdir")
            from vlm import profiling

            print("\n".join(profiling.report(FLAGS.workdir)), flush=True)
        else:
            _require("input", "vocab_size", "output")
            from input_pipeline import tokenizer

            path = tokenizer.main_train(FLAGS.input, FLAGS.vocab_size, FLAGS.output)
            print(f"wrote {path}", flush=True)
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=1)
    except Exception as e:
        code = _run_error_code(e)
        if code is not None:
            # After a failed save, Orbax's writes of the other items may still be in flight.
            _fail(str(e), code, now=type(e).__name__ == "SaveFailed")
        # Every process logs its own error (the console of process 0 is not enough on a pod).
        import jax

        logging.exception("process %d of %d failed", jax.process_index(), jax.process_count())
        raise


# One-line errors of a training run: workdir in use (2), a failed save or no restorable checkpoint (1).
RUN_ERRORS = (("vlm.workdir", "WorkdirBusy", 2), ("vlm.checkpoint", "SaveFailed", 1),
              ("vlm.checkpoint", "CheckpointError", 1))


def _run_error_code(error: BaseException) -> int | None:
    """The exit code of a RUN_ERRORS error, else None (their modules are not imported to ask: an error
    of a module nobody imported cannot have happened)."""
    for module, name, code in RUN_ERRORS:
        if module in sys.modules and isinstance(error, getattr(sys.modules[module], name)):
            return code
    return None


def _data_build() -> None:
    """`vlm data build`: a video/image-caption dataset from a manifest (input_pipeline/builders)."""
    from input_pipeline.builders import manifest, media, video_captions

    try:  # flag values first: one line each
        options = media.EncodeOptions(
            FLAGS.max_short_side, FLAGS.max_fps, FLAGS.max_duration, FLAGS.keyframe_interval, FLAGS.crf,
            FLAGS.reencode,
        )
        options.validate()
        video_captions.named_builder_class(FLAGS.name)
    except ValueError as e:
        _fail(str(e))
    if FLAGS.beam_pipeline_options:
        try:
            import apache_beam  # noqa: F401
        except ImportError:
            _fail("--beam_pipeline_options needs Apache Beam, which is not installed: pip install apache-beam")
    try:
        summary = video_captions.build(
            FLAGS.manifest,
            FLAGS.data_dir,
            FLAGS.name,
            options,
            overwrite=FLAGS.overwrite,
            beam_pipeline_options=FLAGS.beam_pipeline_options,
            allow_outside=FLAGS.allow_outside,
        )
    except (manifest.ManifestError, FileExistsError) as e:
        _fail(str(e))
    print("\n".join(summary.lines()), flush=True)
    print(f"train on it with: --config.data.name={FLAGS.name} --config.data.data_dir={FLAGS.data_dir}", flush=True)


def _downstream(command: str) -> None:
    """`vlm export`, `vlm embed`, `vlm retrieve` (vlm/export.py, vlm/embed.py)."""
    if command == "export":
        _require("workdir", "output")
        from vlm import export

        try:
            folder = export.export(FLAGS.workdir, FLAGS.output, step=FLAGS.step, use_ema=FLAGS.use_ema,
                                   dtype=FLAGS.dtype, format=FLAGS.format)
        except ValueError as e:
            _fail(str(e))
        print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}", flush=True)
        return
    from vlm import embed

    if command == "embed":
        if (FLAGS.workdir is None) == (FLAGS.export is None):
            _fail("vlm embed needs exactly one of --workdir (a run) and --export (an export folder)")
        _require("output")
        try:
            info = embed.embed(FLAGS.workdir or FLAGS.export, FLAGS.output, name=FLAGS.name, split=FLAGS.split,
                               data_dir=FLAGS.data_dir, manifest=FLAGS.manifest, batch_size=FLAGS.batch_size)
        except ValueError as e:
            _fail(str(e))
        import jax

        if jax.process_index() == 0:
            print(f"wrote {info['count']} rows ({info['skipped']} skipped) of {info['source']} to {FLAGS.output}",
                  flush=True)
        return
    _require("index")
    try:
        results = embed.retrieve(FLAGS.index, text=FLAGS.text, video=FLAGS.video, k=FLAGS.k,
                                 model_path=FLAGS.workdir or FLAGS.export)
    except ValueError as e:
        _fail(str(e))
    for r in results:
        print(f"{r['rank']:>3}  {r['score']:.4f}  {r['id']}  {r['caption']}", flush=True)


def _autoencoder(command: str, argv: list[str]) -> None:
    """`vlm reconstruct` and `vlm data encode` (vlm/tasks/autoencoding.py)."""
    from vlm.tasks import autoencoding

    if command == "reconstruct":
        _require("workdir", "out")
        if len(argv) != 3:
            _fail("vlm reconstruct takes one input video: vlm reconstruct --workdir=W in.mp4 --out=out.mp4")
        num_frames = FLAGS.num_frames if FLAGS["num_frames"].present else 0
        try:
            r = autoencoding.reconstruct_file(FLAGS.workdir, argv[2], FLAGS.out, num_frames=num_frames,
                                              resolution=FLAGS.resolution)
        except ValueError as e:
            _fail(str(e))
        print(f"PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}  ({r['frames']} frames of {r['height']}x{r['width']}, "
              f"step {r['step']}); wrote {r['out']}", flush=True)
        return
    _require("vae_workdir", "out_name")
    from vlm import train

    if FLAGS["config"].present:
        data_config = FLAGS.config.data
    else:
        data_config = train.load_config(FLAGS.vae_workdir).data
    with data_config.unlocked():
        if FLAGS.dataset:
            data_config.name = FLAGS.dataset
        if FLAGS.data_dir and FLAGS.dataset:
            data_config.data_dir = FLAGS.data_dir
    try:
        info = autoencoding.encode_dataset(
            FLAGS.vae_workdir, data_config, FLAGS.out_name, data_dir=FLAGS.data_dir or "",
            splits=[s for s in (FLAGS.splits or "").split(",") if s], max_examples=FLAGS.max_examples,
            stored=FLAGS.latents, chunk_size=FLAGS.chunk_size, batch_size=FLAGS.batch_size or 0, seed=FLAGS.seed,
            step=FLAGS.step, overwrite=FLAGS.overwrite)
    except (ValueError, FileExistsError) as e:
        _fail(str(e))
    if info is not None:
        splits = ", ".join(f"{s} {n}" for s, n in info["splits"].items())
        print(f"wrote latent dataset {FLAGS.out_name} ({splits} clips, latents {info['shape']}, {info['stored']}; "
              f"VAE step {info['vae_step']}, hash {info['vae_hash'][:12]})", flush=True)
        print(f"train on it with: --config.data.name={FLAGS.out_name}"
              + (f" --config.data.data_dir={FLAGS.data_dir}" if FLAGS.data_dir else ""), flush=True)


def _one_line(error: BaseException, argv: list[str]) -> str:
    """A flag/config error as one line: the message of the most specific exception in the chain."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    texts = [str(e) for e in chain]
    hint = next((t for t in texts if "Did you mean" in t), None)
    if hint is not None or any(isinstance(e, (KeyError, AttributeError)) for e in chain):
        override = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")), "--config.?")
        suggestion = ""
        if hint:
            suggestion = "; " + hint.split("Did you mean", 1)[1].split("?")[0].strip().join(["did you mean ", "?"])
            suggestion = suggestion.replace("did you mean", "did you mean").replace('"', "")
        return f"unknown config key {override}{suggestion} (the config is locked; see the config file for valid keys)"
    if texts[0].startswith("flag --") and "\n" not in texts[0]:
        return texts[0]  # e.g. "flag --config.optim.lr=abc: could not convert string to float: 'abc'"
    for text in texts[::-1]:  # innermost first: the original message, not absl's wrapping
        lines = [l.strip() for l in text.replace("\\n", "\n").splitlines() if l.strip()]
        useful = [l for l in lines if not l.startswith(("Traceback", "File ", "^", "Attempted", "raise "))]
        if useful:
            return " ".join(useful[-2:]) if "No such file" in useful[-1] else useful[-1]
    return type(chain[0]).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, but a bad config (misspelt key, unknown variant, bad value) is one line, exit 2."""
    try:
        return FLAGS(argv)
    except Exception as e:  # absl wraps config-file and override errors in several exception types
        _fail(_one_line(e, argv))


def run() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
