"""Start a run from another run's weights (`config.init_from`), after the fresh init, never on resume.

    config.init_from = dict(workdir="", step=-1, mapping=(), strict=True, use_ema=True)

The source's parameters (its EMA when it kept one and `use_ema`) are named by `/`-joined paths
("video/encoder/blocks/0/mlp/up/kernel"). `mapping` renames them: (regex, replacement) pairs,
the first pattern that matches a whole source path (`re.fullmatch`) rewrites it to its
replacement ("\\1" for groups, `Match.expand`); a replacement of "" leaves that tensor out on purpose. With no mapping
every source path keeps its name. A renamed path must exist in the model with the same shape;
a source tensor that matches no pattern (or names no parameter of the model) is an error with
`strict`, and left out without it. Target parameters that nothing loads keep their fresh init.

A stack of blocks saved with the other `scan_layers` setting loads too (vlm/nn/scan.py): source tensors
".../blocks/0/rest" ... ".../blocks/{L-1}/rest" fill the model's stacked ".../blocks/rest" [L, ...], and a
stacked source fills the model's per-block tensors (one block per scan step; not the DiT's factorised pairs).

Plan first (metadata only: a one-line ConfigError before anything compiles), then read: each
tensor is restored straight onto the target's sharding, so every process reads only its shards
and a run saved on one mesh loads on any other.

`workdir` may also be an export folder (`vlm export`, `vlm convert`: D/model.safetensors, whose
tensor names are the same "/"-joined paths); `step` and `use_ema` then do not apply (an export
holds one set of weights) and each device reads only its slices of each tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from vlm.errors import ConfigError

EXPORT_ITEM = "export"  # Plan.item when the source is an export folder

@dataclasses.dataclass
class Plan:
    source: str  # the item directory read
    step: int
    item: str  # "params", "ema", or "export" (an export folder's model.safetensors)
    renames: dict[str, str]  # source path → target path, for every tensor that loads
    left_out: list[str]  # source paths not loaded (mapped to "" or, non-strict, unmatched)
    kept_init: list[str]  # target paths nothing loads
    stacked: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # target → its L per-block sources
    sliced: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # target → (stacked source, block)

    def summary(self) -> str:
        loaded = len(self.renames) + len(self.stacked) + len(self.sliced)
        return (f"init_from: loaded {loaded} tensors from {self.source} (step {self.step}, {self.item}); "
                + (f"{len(self.stacked)} stacked from per-block tensors, " if self.stacked else "")
                + (f"{len(self.sliced)} sliced from stacked ones, " if self.sliced else "")
                + f"{len(self.kept_init)} of the model's {loaded + len(self.kept_init)} keep their init"
                + (f" ({', '.join(self.kept_init[:6])}{', ...' if len(self.kept_init) > 6 else ''})"
                   if self.kept_init else "")
                + (f"; {len(self.left_out)} source tensors left out" if self.left_out else ""))


def _name(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _flat(tree) -> dict[str, object]:
    """{"a/b/0/kernel": leaf}: the names `optim.frozen` and the mapping regexes see."""
    return {_name(path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def _source_step(checkpoints: epath.Path, step: int) -> int:
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []
    if not steps:
        raise ConfigError(f"config.init_from.workdir: no checkpoint in {checkpoints}; name a trained run's workdir")
    if step is None or step < 0:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"config.init_from.step={step}: {checkpoints} has steps {steps}")
    return step


def _metadata_tree(path: epath.Path):
    metadata = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def plan(init_config, abstract_params) -> Plan:
    """Checks the source against the model (`abstract_params`: pure dict of ShapeDtypeStructs)."""
    from vlm import export

    c = init_config
    if (epath.Path(c.workdir) / export.WEIGHTS).exists():  # an export folder
        step, item, source = int(export.read_metadata(c.workdir).get("step", 0)), EXPORT_ITEM, c.workdir
        src = {name: jax.ShapeDtypeStruct(shape, "float32") for name, shape in export.read_shapes(c.workdir).items()}
    else:
        checkpoints = epath.Path(c.workdir) / "checkpoints"
        step = _source_step(checkpoints, c.get("step", -1))
        item = "ema" if c.get("use_ema", True) and (checkpoints / str(step) / "ema").exists() else "params"
        source = checkpoints / str(step) / item
        src = _flat(_metadata_tree(source))
    dst = _flat(abstract_params)
    rules = []
    for entry in c.get("mapping", ()) or ():
        if len(entry) != 2:
            raise ConfigError(f"config.init_from.mapping entry {entry!r} must be a (regex, replacement) pair")
        try:
            rules.append((re.compile(entry[0]), str(entry[1])))
        except re.error as e:
            raise ConfigError(f"config.init_from.mapping: {entry[0]!r} is not a valid regex ({e})") from None
    strict = bool(c.get("strict", True))
    renames, left_out, named = {}, [], {}
    for path in src:
        target = path
        if rules:
            match = next(((m, rep) for rx, rep in rules if (m := rx.fullmatch(path))), None)
            if match is None:
                if strict:
                    raise ConfigError(f"config.init_from: source tensor {path} matches no mapping pattern; map it, "
                                      f"map it to '' to leave it out, or set config.init_from.strict=False")
                left_out.append(path)
                continue
            target = match[0].expand(match[1])
            if target == "":
                left_out.append(path)
                continue
        named[path] = target
    stacked, sliced = _other_layout({t: src[p].shape for p, t in named.items()}, {t: x.shape for t, x in dst.items()})
    converted = {s for ss in stacked.values() for s in ss} | {s for s, _ in sliced.values()}  # renamed source names
    for path, target in named.items():
        meta = src[path]
        if target in converted:
            continue
        if target not in dst:
            if strict:
                raise ConfigError(f"config.init_from: source tensor {path} → {target}, which is not a parameter of "
                                  f"the model; fix config.init_from.mapping or set config.init_from.strict=False")
            left_out.append(path)
            continue
        if tuple(meta.shape) != tuple(dst[target].shape):
            raise ConfigError(f"config.init_from: source tensor {path} has shape {tuple(meta.shape)} but the model's "
                              f"{target} has shape {tuple(dst[target].shape)}")
        if target in renames.values():
            raise ConfigError(f"config.init_from.mapping sends two source tensors to {target}")
        renames[path] = target
    # stacked / sliced are in target names; read them under their source names
    source_of = {t: p for p, t in named.items()}
    stacked = {t: [source_of[s] for s in ss] for t, ss in stacked.items()}
    sliced = {t: (source_of[s], i) for t, (s, i) in sliced.items()}
    kept = sorted(set(dst) - set(renames.values()) - set(stacked) - set(sliced))
    return Plan(str(source), step, item, renames, left_out, kept, stacked, sliced)


def _other_layout(src: dict[str, tuple], dst: dict[str, tuple]) -> tuple[dict, dict]:
    """Stacks saved in the other `scan_layers` layout, by name and shape (names are the renamed source names).

    Returns ({model path: [source paths of blocks 0..L-1]}, {model path: (stacked source path, block)}): a model
    tensor A/B of shape [L, *s] made of sources A/0/B ... A/{L-1}/B of shape s, and a model tensor A/i/B of
    shape s cut from a source A/B of shape [L, *s]."""
    stacked: dict[str, dict[int, str]] = {}
    for path, shape in src.items():
        if path in dst:
            continue
        keys = path.split("/")
        for k, key in enumerate(keys):
            joined = "/".join(keys[:k] + keys[k + 1:])
            if key.isdigit() and joined in dst and tuple(dst[joined][1:]) == tuple(shape):
                stacked.setdefault(joined, {})[int(key)] = path
                break
    stacked = {t: [by_block[i] for i in range(len(by_block))] for t, by_block in stacked.items()
               if sorted(by_block) == list(range(dst[t][0]))}
    sliced = {}
    for path, shape in src.items():
        if path in dst or not shape:
            continue
        keys = path.split("/")
        for k in range(len(keys)):
            blocks = ["/".join(keys[:k] + [str(i)] + keys[k:]) for i in range(shape[0])]
            if all(b in dst and tuple(dst[b]) == tuple(shape[1:]) for b in blocks):
                sliced.update({b: (path, i) for i, b in enumerate(blocks)})
                break
    return stacked, sliced


def apply(p: Plan, params, shardings):
    """`params` (pure dict of arrays) with the planned tensors read from the source onto `shardings`."""
    flat_params, flat_shardings = _flat(params), _flat(shardings)
    targets = {path: jax.ShapeDtypeStruct(flat_params[target].shape, flat_params[target].dtype,
                                          sharding=flat_shardings[target]) for path, target in p.renames.items()}
    # The other layout: each block read with the target's sharding without (stacking) or with (slicing) the
    # leading "layers" axis, which the default rules leave unsharded.
    for target, sources in p.stacked.items():
        block = _with_spec(flat_shardings[target], lambda spec: spec[1:])
        targets.update({s: jax.ShapeDtypeStruct(flat_params[target].shape[1:], flat_params[target].dtype,
                                                sharding=block) for s in sources})
    depth = collections.Counter(source for source, _ in p.sliced.values())  # stacked source → its blocks
    for target, (source, _) in p.sliced.items():
        whole = _with_spec(flat_shardings[target], lambda spec: (None, *spec))
        targets[source] = jax.ShapeDtypeStruct((depth[source], *flat_params[target].shape), flat_params[target].dtype,
                                               sharding=whole)
    if p.item == EXPORT_ITEM:
        from vlm import export

        loaded = export.read_arrays(p.source, targets)
    else:
        src_keys = {_name(k): k for k in traverse_util.flatten_dict(_metadata_tree(epath.Path(p.source)))}
        item = {src_keys[path]: target for path, target in targets.items()}
        restore_args = {key: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype) for key, t in item.items()}
        restored = ocp.PyTreeCheckpointer().restore(p.source, args=ocp.args.PyTreeRestore(
            item=traverse_util.unflatten_dict(item), restore_args=traverse_util.unflatten_dict(restore_args),
            partial_restore=True))
        loaded = _flat(restored)
    for path, target in p.renames.items():
        flat_params[target] = loaded[path]
    if p.stacked or p.sliced:  # one program for all of them: {source path: array} → {target path: array}
        def convert(blocks):
            out = {t: jax.numpy.stack([blocks[s] for s in sources]) for t, sources in p.stacked.items()}
            return out | {t: blocks[source][index] for t, (source, index) in p.sliced.items()}

        sources = {s for ss in p.stacked.values() for s in ss} | {s for s, _ in p.sliced.values()}
        out_shardings = {t: flat_shardings[t] for t in (*p.stacked, *p.sliced)}
        flat_params.update(jax.jit(convert, out_shardings=out_shardings)({s: loaded[s] for s in sources}))
    keys = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: flat_params[_name(k)] for k in keys})


def _with_spec(named_sharding, change):
    """The NamedSharding with its PartitionSpec changed by `change` (a function of the spec's tuple)."""
    spec = tuple(named_sharding.spec)
    return jax.sharding.NamedSharding(named_sharding.mesh, jax.sharding.PartitionSpec(*change(spec)))
