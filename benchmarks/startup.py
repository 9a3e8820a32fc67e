"""What a run pays outside its train steps: building the setup, the jitted init, and each eval.

    python benchmarks/startup.py                                      # tiny dual encoder, 5 evals
    python benchmarks/startup.py --config=configs/dual_encoder.py:B/16 --evals=0   # no state allocated for evals

Times, in this process (start it with JAX_COMPILATION_CACHE_DIR= for no persistent cache): `train.build`
(abstract model, shardings, abstract state), `setup.init.lower()` (tracing the model's construction) and its
`compile()`, then --evals runs of the config's evaluators on the fresh state, each on a new model object as the
train loop makes them (`setup.eval_model(state)`), with the number of JAX traces each one caused. Every eval
after the first should trace nothing (benchmarks/README.md, "Startup and evaluation cost").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402

from throughput import load_config  # noqa: E402
from vlm import host_memory, sharding, train  # noqa: E402
from vlm.eval import evaluators  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dual_encoder.py:tiny", help="PATH:VARIANT")
    p.add_argument("--evals", type=int, default=5, help="evaluator runs on the initial state (0: no init run)")
    args = p.parse_args(argv)
    host_memory.configure()  # as every `vlm` command does
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: traces.append(event) if event == "/jax/core/compile/jaxpr_trace_duration" else None)

    config = load_config(args.config)
    mesh = sharding.create_mesh(config.mesh)
    t = time.perf_counter()
    setup = train.build(config, mesh)
    print(f"train.build: {time.perf_counter() - t:.2f} s", flush=True)
    with sharding.use_mesh(mesh, setup.rules):
        t = time.perf_counter()
        lowered = setup.init.lower()
        print(f"init lowering: {time.perf_counter() - t:.2f} s", flush=True)
        t = time.perf_counter()
        init = lowered.compile()
        print(f"init compile: {time.perf_counter() - t:.2f} s", flush=True)
        if args.evals:
            state = init()
            chosen = evaluators.from_config(config, setup.task)
            for i in range(args.evals):
                before, t = len(traces), time.perf_counter()
                evaluators.run(chosen, setup.eval_model(state), mesh=mesh, step=i, workdir=None)
                print(f"eval {i}: {time.perf_counter() - t:.2f} s, {len(traces) - before} traces", flush=True)


if __name__ == "__main__":
    main()
