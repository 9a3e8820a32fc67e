"""FLOPs of one compiled train step with k microbatches, per-example vs batch-level (GradCache) loss.

    python benchmarks/accumulation_flops.py

The scans are unrolled here (`accumulation.SCAN_UNROLL = True`) because XLA's cost analysis counts
a loop body once whatever its trip count. Expected: per-example accumulation costs what one
batch costs; GradCache pays a second forward of the towers (about +1/3).
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from tests import toy_tasks  # noqa: E402
from tests.helpers import random_batch, small_config  # noqa: E402
from vlm import accumulation, sharding, train  # noqa: E402


def step_flops(task_name: str, k: int) -> float:
    config = small_config(data=2, fsdp=4, tensor=1)
    config.task.name, config.batch_size, config.microbatches = task_name, 32, k
    mesh = sharding.create_mesh(config.mesh)
    setup = train.build(config, mesh)
    with sharding.use_mesh(mesh, setup.rules):
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                setup.abstract_state, setup.state_shardings)
        batch = sharding.global_batch(random_batch(config), mesh)
        return setup.train_step.lower(abstract, batch).compile().cost_analysis()["flops"]


if __name__ == "__main__":
    toy_tasks.register()
    accumulation.SCAN_UNROLL = True
    print("| loss | k=1 GFLOP | k=4 GFLOP | ratio |\n|---|---|---|---|")
    for name, task in (("per-example (toy_alignment)", "toy_alignment"), ("batch-level (contrastive)", "contrastive")):
        f1, f4 = step_flops(task, 1), step_flops(task, 4)
        print(f"| {name} | {f1 / 1e9:.4f} | {f4 / 1e9:.4f} | {f4 / f1:.3f} |", flush=True)
