"""The device mesh, logical-axis rules, and helpers that place arrays on it.

Models name only *logical* axes (`batch`, `embed`, `mlp`, ...). The config's
rules map them to the mesh axes `data`, `fsdp`, `context`, `tensor`; nothing else in
the code base names a mesh axis except `BATCH_AXES` below.

Context parallelism: the `context` axis splits *activations* along their sequence
(`tokens → context`), never parameters. A parameter with a sequence axis (a learned
position table, `[tokens, embed]`) is placed with `parameter_rules(rules)`, which
leaves the sequence names (`SEQUENCE_AXES`) unmapped, so it stays whole along that
axis whatever the context size (and `check_divisible` never sees a table split over
context). Parameters are replicated over `context` by default; a config that wants
them split there too (ZeRO-style, as MaxText does) adds `context` to the `embed`
rule: `[["embed", ["fsdp", "context"]], ...]`. With `context` = 1 (configs that don't
name it) every placement is the same as without the axis.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import NamedSharding, PartitionSpec as P

# Device order: data (outermost, slowest links) ... tensor (innermost, fastest links). Context
# parallelism exchanges keys/values every attention layer, so it sits next to tensor.
MESH_AXES = ("data", "fsdp", "context", "tensor")
# The global batch is split over these mesh axes (data parallel + FSDP).
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("frames", None),
    ("tokens", "context"),  # activations only (see parameter_rules)
    ("layers", None),  # the leading axis of scanned (stacked) layers
    ("head_dim", None),
    ("conv_in", None),
    ("conv_out", None),
)

# Logical axes that index positions in a sequence: split over `context` in activations only.
SEQUENCE_AXES = ("tokens", "frames")

# Parameters and module construction never shard eagerly: shardings are derived
# from the abstract model and applied by a jitted init (see train.py).
nnx.use_eager_sharding(False)


class MeshError(ValueError):
    pass


def mesh_shape(mesh_config: Mapping[str, Any], num_devices: int) -> dict[str, int]:
    """Resolves the config's (within-slice) axis sizes; at most one axis may be -1 (fills the rest).

    An axis the config does not name has size 1 (configs and saved workdirs from before `context`).
    """
    sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
    fill = [name for name, size in sizes.items() if size == -1]
    bad = [name for name, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise MeshError(
            f"config.mesh.{bad[0]}={sizes[bad[0]]} is not a valid axis size; use a positive size or -1 to fill"
        )
    if len(fill) > 1:
        raise MeshError(
            f"config.mesh has -1 on {', '.join(fill)}; at most one axis may be -1 (it fills the remaining devices)"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise MeshError(
                f"config.mesh: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; choose sizes whose product divides {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        shown = "*".join(f"{n}={s}" for n, s in sizes.items() if n in mesh_config or s != 1)
        raise MeshError(
            f"config.mesh {shown} needs {fixed} devices but {num_devices} are available; "
            f"set one axis to -1 (e.g. --config.mesh.data=-1) or make the product {num_devices}"
        )
    return sizes


def dcn_shape(mesh_config: Mapping[str, Any]) -> dict[str, int]:
    """Between-slice (DCN) part of each axis; all 1 on a single slice / node."""
    dcn = mesh_config.get("dcn") or {}
    sizes = {name: int(dcn.get(name, 1)) for name in MESH_AXES}
    bad = [name for name, size in sizes.items() if size < 1]
    if bad:
        raise MeshError(f"config.mesh.dcn.{bad[0]}={sizes[bad[0]]} must be ≥ 1 (the number of slices along that axis)")
    return sizes


def axis_sizes(mesh_config: Mapping[str, Any], num_devices: int) -> dict[str, int]:
    """Total size of each mesh axis: within-slice (ICI) part × between-slice (DCN) part."""
    dcn = dcn_shape(mesh_config)
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise MeshError(
            f"config.mesh.dcn asks for {slices} slices but {num_devices} devices do not split evenly into them"
        )
    ici = mesh_shape(mesh_config, num_devices // slices)
    return {name: ici[name] * dcn[name] for name in MESH_AXES}


def create_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, context, tensor) mesh with Auto axis types (pjit-style sharding).

    With `mesh.dcn` products > 1 (multislice TPU, multi-node GPU) devices are laid out
    as a hybrid mesh, MaxText-style: the DCN part of each axis spans slices (or
    processes, where all devices are in one slice), the ICI part stays inside one.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = dcn_shape(mesh_config)
    slices = math.prod(dcn.values())
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        sizes = mesh_shape(mesh_config, len(devices))
        return jax.make_mesh(tuple(sizes[n] for n in MESH_AXES), MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    ici = mesh_shape(mesh_config, len(devices) // slices)
    device_array = mesh_utils.create_hybrid_device_mesh(
        tuple(ici[n] for n in MESH_AXES),
        tuple(dcn[n] for n in MESH_AXES),
        devices,
        # TPU multislice: granules are slices. GPUs/CPUs (one "slice"): granules are processes (hosts).
        process_is_granule=len({getattr(d, "slice_index", 0) for d in devices}) == 1,
    )
    return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=axis_types)


def logical_rules(rules_config: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Config rules (list of [logical, mesh axis | [mesh axes] | None]) as a tuple; [] = defaults."""
    if not rules_config:
        return DEFAULT_RULES
    out = []
    for rule in rules_config:
        logical, mesh_axes = rule
        if isinstance(mesh_axes, (list, tuple)):
            mesh_axes = tuple(mesh_axes)
        out.append((str(logical), mesh_axes))
    return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]):
    """Makes `mesh` current for jit and `rules` current for `constrain` / partition specs."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def logical_to_mesh_spec(logical_axes: Sequence[str | None]) -> P:
    return nn.logical_to_mesh_axes(tuple(logical_axes), spmd.get_logical_axis_rules())


def active() -> bool:
    """Whether a mesh and logical-axis rules are current (inside `use_mesh`)."""
    return bool(spmd.get_logical_axis_rules()) and not jax.sharding.get_abstract_mesh().empty


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`.

    Used at block boundaries only (DESIGN.md): XLA propagates the rest.
    """
    if not active():
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical_axes))


def parameter_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """The rules for parameters and other model state: sequence axes (`SEQUENCE_AXES`) unmapped.

    A sequence split belongs to activations (context parallelism); a parameter indexed by
    position (a position table) must not be split along it.
    """
    return tuple((logical, None if logical in SEQUENCE_AXES else axes) for logical, axes in rules)


def state_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh, rules) -> Any:
    """NamedShardings for an (abstract) nnx.State, as a pure dict mirroring `to_pure_dict`.

    Placed by `parameter_rules(rules)`: never split along a sequence axis.
    """
    with nnx.logical_axis_rules(parameter_rules(rules)):
        specs = nnx.get_partition_spec(abstract_state)
    specs = nnx.to_pure_dict(specs)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over BATCH_AXES, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Each process's slice of the batch → global jax.Arrays sharded over the batch axes.

    Host-side entries stay on the host and are dropped here: strings (captions) and
    pipeline counters named "data/..." (e.g. "data/skipped", a per-process scalar).
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if key.startswith("data/") or value.dtype == object or value.dtype.kind in "US":
            continue
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


def check_divisible(abstract_tree, shardings) -> None:
    """Every sharded dimension must split evenly over its mesh axes; raises one line naming the first that doesn't.

    Runs on abstract shapes, before anything is allocated or compiled.
    """
    from vlm.errors import ConfigError

    leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), named in zip(leaves, specs):
        for dim, axes in enumerate(named.spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(named.mesh.shape[a] for a in axes)
            if leaf.shape[dim] % ways:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(
                    f"parameter {name} has size {leaf.shape[dim]} in dimension {dim}, which does not split over mesh "
                    f"axes {'x'.join(axes)}={ways}; change config.mesh (e.g. --config.mesh.{axes[0]}=1) or the model size"
                )
