"""Start a run from another run's weights (`config.init_from`), after the fresh init, never on resume.

    config.init_from = dict(workdir="", step=-1, mapping=(), strict=True, use_ema=True)

The source's parameters (its EMA when it kept one and `use_ema`) are named by `/`-joined paths
("video/encoder/blocks/0/mlp/up/kernel"). `mapping` renames them: (regex, replacement) pairs,
the first pattern that matches a whole source path (`re.fullmatch`) rewrites it to its
replacement ("\\1" for groups, `Match.expand`); a replacement of "" leaves that tensor out on purpose. With no mapping
every source path keeps its name. A renamed path must exist in the model with the same shape;
a source tensor that matches no pattern (or names no parameter of the model) is an error with
`strict`, and left out without it. Target parameters that nothing loads keep their fresh init.

Plan first (metadata only: a one-line ConfigError before anything compiles), then read: each
tensor is restored straight onto the target's sharding, so every process reads only its shards
and a run saved on one mesh loads on any other.

`workdir` may also be an export folder (`vlm export`, `vlm convert`: D/model.safetensors, whose
tensor names are the same "/"-joined paths); `step` and `use_ema` then do not apply (an export
holds one set of weights) and each device reads only its slices of each tensor.
"""

from __future__ import annotations

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

    def summary(self) -> str:
        return (f"init_from: loaded {len(self.renames)} tensors from {self.source} (step {self.step}, {self.item}); "
                f"{len(self.kept_init)} of the model's {len(self.renames) + len(self.kept_init)} keep their init"
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
    renames, left_out = {}, []
    for path, meta in src.items():
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
    kept = sorted(set(dst) - set(renames.values()))
    return Plan(str(source), step, item, renames, left_out, kept)


def apply(p: Plan, params, shardings):
    """`params` (pure dict of arrays) with the planned tensors read from the source onto `shardings`."""
    flat_params, flat_shardings = _flat(params), _flat(shardings)
    targets = {path: jax.ShapeDtypeStruct(flat_params[target].shape, flat_params[target].dtype,
                                          sharding=flat_shardings[target]) for path, target in p.renames.items()}
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
    keys = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: flat_params[_name(k)] for k in keys})
