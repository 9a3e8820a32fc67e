"""The shared eval loop: the held-out split, sharded over the mesh, outputs brought to the host.

Every evaluator that scores per-example outputs (embeddings, captions, reconstructions, losses)
uses `eval_outputs`: it reads the eval split once (each process its rows of every global batch,
the last batch padded), runs a jitted function on the global batch, and returns the outputs of
the real rows only, gathered from all processes, in split order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from vlm import sharding


def eval_outputs(
    fn: Callable[[dict[str, jax.Array]], Mapping[str, jax.Array]],
    data_config,
    *,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
    host_keys: Sequence[str] = ("caption",),
    max_batches: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """(outputs, host): fn's outputs {name: [N, ...]} and the host-side fields (e.g. captions) {name: [N]}.

    fn: global batch (video uint8 [B, T, H, W, 3], tokens int32 [B, L], ...) → {name: [B, ...]},
    jitted by the caller (sharded like the batch). N = the number of real (unpadded) eval examples,
    or fewer with `max_batches`.
    """
    from jax.experimental import multihost_utils

    from input_pipeline import pipeline

    outputs: dict[str, list[np.ndarray]] = {}
    host: dict[str, list] = {k: [] for k in host_keys}
    for i, local in enumerate(pipeline.create_eval_iterator(data_config, global_batch_size=global_batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = sharding.global_batch(local, mesh)
        out = fn(batch)
        mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True))
        for name, value in out.items():
            outputs.setdefault(name, []).append(np.asarray(multihost_utils.process_allgather(value, tiled=True))[mask])
        for key in host_keys:
            if key in local:
                host[key].extend(allgather_strings(local[key], local["mask"]))
    return {k: np.concatenate(v) for k, v in outputs.items()}, host


def allgather_strings(values: np.ndarray, mask: np.ndarray, width: int = 512) -> list[str]:
    """The masked strings of every process's rows, in process order. Strings stay on the host;
    with one process nothing needs gathering."""
    local = [str(c) for c, m in zip(values, mask) if m]
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    # Strings cannot be all-gathered directly: gather fixed-width byte arrays.
    enc = np.zeros((len(values), width), np.uint8)
    for i, c in enumerate(values):
        b = str(c).encode()[:width]
        enc[i, : len(b)] = np.frombuffer(b, np.uint8)
    all_enc = multihost_utils.process_allgather(enc, tiled=True)
    all_mask = multihost_utils.process_allgather(np.asarray(mask), tiled=True)
    return [bytes(row).rstrip(b"\0").decode() for row, m in zip(all_enc, all_mask) if m]
