"""Named evaluators from `config.evals`, each with its own cadence (big_vision's `config.evals`).

    config.evals = dict(
        retrieval=dict(type="retrieval"),                      # every config.eval_every steps
        fm_loss=dict(type="fm_loss", every=500, num_batches=4),
        samples=dict(type="generation", every=5000, prefix="gen/"),
    )

`type` names one of the task's evaluators (`task.evaluators()`); `every` is in steps (0 = the
run's `eval_every`); `prefix` is put before the evaluator's metric names (default "eval/"); every
other key is passed to the evaluator as an option. Every evaluator also runs after the last step.
With `config.evals` empty, each of the task's evaluator types runs once under its own name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from vlm.errors import ConfigError

RESERVED = ("type", "every", "prefix")


@dataclasses.dataclass(frozen=True)
class Evaluator:
    name: str
    type: str
    every: int
    prefix: str
    options: Mapping
    fn: object  # fn(model, *, mesh, step, workdir, **options) -> {name: float}

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps


def from_config(config, task) -> list[Evaluator]:
    """The run's evaluators; a one-line ConfigError for an unknown type, a bad cadence or a name clash."""
    available = dict(task.evaluators())
    entries = dict(config.get("evals") or {}) or {t: {"type": t} for t in available}
    out, seen = [], {}
    for name, entry in entries.items():
        entry = dict(entry)
        kind = entry.get("type", name)
        if kind not in available:
            raise ConfigError(f"config.evals.{name}.type={kind!r} is not an evaluator of task "
                              f"{config.task.name!r}; choose one of {', '.join(available) or '(none)'}")
        every = int(entry.get("every", 0) or config.eval_every)
        if every <= 0:
            raise ConfigError(f"config.evals.{name}.every={entry.get('every')} must be a positive number of steps "
                              f"(or 0 for config.eval_every)")
        prefix = str(entry.get("prefix", "eval/"))
        if (kind, prefix) in seen:
            raise ConfigError(f"config.evals.{name} and config.evals.{seen[kind, prefix]} are both {kind!r} evaluators "
                              f"writing under {prefix!r}; give one a different prefix")
        seen[kind, prefix] = name
        options = {k: v for k, v in entry.items() if k not in RESERVED}
        out.append(Evaluator(name, kind, every, prefix, options, available[kind]))
    return out


def select(evaluators: Sequence[Evaluator], names: str | None) -> list[Evaluator]:
    """The evaluators named in a comma-separated list (all when None or empty)."""
    if not names:
        return list(evaluators)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {e.name: e for e in evaluators}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError(f"--evals: {', '.join(unknown)} not among this run's evaluators ({', '.join(known)})")
    return [known[n] for n in wanted]


def run(evaluators: Sequence[Evaluator], model, *, mesh, step: int, workdir: str | None) -> dict[str, float]:
    """Runs each evaluator; their metrics with the evaluator's prefix."""
    metrics = {}
    for e in evaluators:
        out = e.fn(model, mesh=mesh, step=step, workdir=workdir, **e.options)
        metrics.update({f"{e.prefix}{k}": float(v) for k, v in out.items()})
    return metrics
