"""Model FLOPs of a train step, for MFU: the task's own count, or XLA's count of a CPU lowering."""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from flax import nnx

from vlm import sharding, tasks


def model_flops_per_step(setup, batch: dict[str, jax.Array]) -> float | None:
    """Model FLOPs of one train step: 3× the forward pass (fwd + 2× bwd), counted by XLA.

    A task may count them itself (`task.model_flops_per_step(batch)`). Otherwise they are counted
    on the un-rematerialised forward graph, so recomputation is not credited (MFU, not hardware
    utilisation). The forward is lowered for one *CPU* device whatever the accelerator:
    `Lowered.cost_analysis` is not implemented by the PJRT plugins (CUDA, TPU), and a compiled GPU
    program's count leaves out the cuBLAS matmuls (measured on an H200: ~4% of the FLOPs). The
    count depends only on the program and its shapes.
    """
    task, graphdef = setup.task, setup.graphdef
    if hasattr(task, "model_flops_per_step"):
        return float(task.model_flops_per_step(batch))
    scanned = _scan_layers_keys(setup.config.model)
    if setup.config.model.get("attention_impl", "xla") != "xla" or scanned:
        # A fused GPU kernel has no CPU lowering; the same attention written in XLA counts the same FLOPs. XLA
        # counts a scan's body once, not once per layer: scanned stacks are counted unrolled.
        config = ml_collections.ConfigDict(setup.config.to_dict())
        config.model.attention_impl = "xla"
        for path in scanned:
            node = config.model
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = False
        task = tasks.get(config)
        with sharding.use_mesh(setup.mesh, setup.rules):
            graphdef, abstract_params, abstract_vars = nnx.split(
                nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), nnx.Param, ...)
        abstract_params, abstract_vars = nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(abstract_vars)
    else:
        abstract_params, abstract_vars = setup.abstract_state["params"], setup.abstract_state.get("model_state", {})

    def forward(params, variables, batch):
        model = nnx.merge(graphdef, params, variables)
        return task.loss(model, task.features(model, batch, jax.random.key(0)), batch)[0]

    try:
        cpu_mesh = sharding.create_mesh({a: 1 for a in sharding.MESH_AXES}, jax.devices("cpu")[:1])
        on_cpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(cpu_mesh))
        params = jax.tree.map(on_cpu, abstract_params)
        variables = jax.tree.map(on_cpu, abstract_vars)
        shapes = jax.tree.map(on_cpu, dict(batch))
        with sharding.use_mesh(cpu_mesh, setup.rules):
            cost = jax.jit(forward).lower(params, variables, shapes).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return 3.0 * float(cost["flops"])
    except Exception as e:  # best effort: a missing count must never stop training
        logging.warning("model FLOPs not counted (%s); MFU will not be logged", e)
        return None


def _scan_layers_keys(model_config, prefix: tuple = ()) -> list[tuple]:
    """Paths under config.model of every `scan_layers` that is on (model.video, model.text, model.dit, ...)."""
    out = []
    for key, value in model_config.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out += _scan_layers_keys(value, (*prefix, key))
        elif key == "scan_layers" and value:
            out.append((*prefix, key))
    return out
