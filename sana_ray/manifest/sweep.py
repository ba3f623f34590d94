"""The ``kind: Sweep`` manifest: a hyper-parameter search (Ray Tune) over a training spec.

A sweep wraps a complete TrainingRun spec (``spec.template``) and says which of its values to
search (``spec.search.space``, keyed by dotted paths relative to the template, like command-line
overrides)::

    apiVersion: sana-ray/v1
    kind: Sweep
    metadata: {name: lr-shift}
    spec:
      template: {model, datasets, training, validation, hardware, tracking, output}  # a TrainingRun spec
      search:
        space:
          training.optimizer.lr: {loguniform: [1.0e-6, 1.0e-4]}
          training.flow_shift: {choice: [1, 3, 6]}
        metric: null                      # null: eval_loss with eval datasets, else loss
        mode: min
        num_samples: 8
        scheduler: {name: asha, grace_period: 100}
        max_concurrent_trials: null       # null: as many as the cluster fits at once

Every trial's manifest is the template with the trial's values set at those paths. Before
anything starts, :func:`check_space` sets every bound and choice of every path into the template
and validates the result, so a trial can never start with an invalid manifest.

Light like the rest of the package: pydantic and PyYAML only.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Callable, Literal

from pydantic import Field, ValidationError, model_validator

from .errors import ManifestError, Problem, format_path, problems_from_validation_error, shorten
from .overrides import apply_override
from .schema import API_VERSION, Manifest, Metadata, Spec, Strict

# The search may only move what trains the model: model and data changes need their own caches
# (built once per sweep, before the trials), and hardware is the per-trial scaling.
SEARCHABLE_PREFIXES = ("training.",)
DOMAIN_KINDS = ("loguniform", "uniform", "randint", "choice", "grid_search")
# Each listed value is validated into the template before the sweep starts (check_space): ~1 ms each.
MAX_DOMAIN_VALUES = 1000


class Domain(Strict):
    """One searched value: exactly one of the keys below."""

    loguniform: tuple[float, float] | None = Field(default=None, description="[low, high]: log-uniform, low > 0.")
    uniform: tuple[float, float] | None = Field(default=None, description="[low, high]: uniform.")
    randint: tuple[int, int] | None = Field(default=None, description="[low, high]: an integer, low <= n < high.")
    choice: Annotated[list[Any], Field(min_length=1, max_length=MAX_DOMAIN_VALUES)] | None = Field(
        default=None, description=f"One of these, sampled (at most {MAX_DOMAIN_VALUES})."
    )
    grid_search: Annotated[list[Any], Field(min_length=1, max_length=MAX_DOMAIN_VALUES)] | None = Field(
        default=None,
        description=f"Every one of these (each combination of grid values is a trial, num_samples times; at most {MAX_DOMAIN_VALUES}).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "Domain":
        given = [k for k in DOMAIN_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAIN_KINDS)}" + (f"; got {', '.join(given)}" if given else ""))
        kind = given[0]
        if kind in ("loguniform", "uniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAIN_KINDS if getattr(self, k) is not None)

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can get: both bounds, or every listed value."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]  # Tune's randint excludes high
        return list(value)


class SchedulerSpec(Strict):
    name: Literal["asha", "hyperband", "median", "fifo"] = Field(
        default="asha",
        description="asha: asynchronous successive halving (stops the worse trials at rungs grace_period x "
        "reduction_factor^k); hyperband: synchronous HyperBand; median: stop a trial whose metric is worse than "
        "the median of the others at the same step; fifo: no early stopping.",
    )
    grace_period: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Training steps a trial runs before it can be stopped. null: training.checkpoint_every."
    )
    reduction_factor: Annotated[float, Field(gt=1)] = Field(default=2.0, description="asha/hyperband: keep 1/reduction_factor of the trials at each rung.")
    max_t: Annotated[int, Field(ge=1)] | None = Field(default=None, description="asha/hyperband: the most steps a trial trains. null: training.steps.")


class SearchSpec(Strict):
    space: dict[str, Domain] = Field(
        min_length=1,
        description="Dotted paths relative to the template (training.optimizer.lr, training.flow_shift, ...) -> "
        "a domain: {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {randint: [lo, hi]}, {choice: [...]}, {grid_search: [...]}.",
    )
    metric: str | None = Field(
        default=None,
        description="What the scheduler and 'best' compare: a metric the train loop reports at each checkpoint. "
        "eval_loss: the stable evaluation loss on the template's dataset_type eval datasets (fixed sigmas and "
        "noise, so trials compare; eval_loss/<dataset> for one of several); loss: the training loss of the "
        "checkpoint step (noisy). null: eval_loss when the template has an eval dataset, else loss (apply says so).",
    )
    mode: Literal["min", "max"] = "min"
    num_samples: Annotated[int, Field(ge=1)] = Field(
        default=1, description="Trials drawn (random/optuna); with grid_search, each grid combination is repeated this often."
    )
    algorithm: Literal["random", "grid", "optuna"] = Field(
        default="random",
        description="random: sample every domain (grid_search values are all tried); grid: every listed value of every "
        "path (choice and grid_search only); optuna: Optuna's TPE sampler (no grid_search).",
    )
    seed: int | None = Field(default=0, description="Seed of the random/optuna sampler (null: not reproducible).")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Trials trained at once. null: as many as the cluster's GPUs (CPUs without use_gpu) fit, each "
        "trial taking hardware.num_workers workers.",
    )

    @model_validator(mode="after")
    def _algorithm_fits_space(self) -> "SearchSpec":
        kinds = {path: domain.kind for path, domain in self.space.items()}
        if self.algorithm == "grid":
            continuous = sorted(p for p, k in kinds.items() if k not in ("choice", "grid_search"))
            if continuous:
                raise ValueError(f"algorithm grid needs choice or grid_search domains; {', '.join(continuous)} "
                                 "is continuous (use algorithm random or optuna)")
        if self.algorithm == "optuna":
            grids = sorted(p for p, k in kinds.items() if k == "grid_search")
            if grids:
                raise ValueError(f"algorithm optuna does not take grid_search ({', '.join(grids)}); use choice")
        return self


EVAL_METRIC = "eval_loss"  # train.evaluation.EVAL_METRIC (not imported: that module needs torch)


class SweepSpec(Strict):
    template: Spec = Field(description="The TrainingRun spec every trial starts from (model, datasets, training, ...).")
    search: SearchSpec

    @model_validator(mode="after")
    def _metric_fits_the_template(self) -> "SweepSpec":
        """Fill the default metric and refuse an eval metric the trials could never report."""
        evaluated = self.template.evaluation_datasets()
        if self.search.metric is None:
            self.search.metric = EVAL_METRIC if evaluated else "loss"
        metric = self.search.metric
        if metric != EVAL_METRIC and not metric.startswith(EVAL_METRIC + "/"):
            return self
        if not evaluated:
            if self.template.evaluation.enabled is False:
                why, fix = "evaluation.enabled is false", "remove template.evaluation.enabled: false"
            else:
                why, fix = ("no enabled dataset has dataset_type: eval",
                            "add a held-out dataset with dataset_type: eval to spec.template.datasets")
            raise ValueError(f"search.metric is {metric!r} but the template does not evaluate: {why}; {fix}, "
                             f"or set search.metric: loss")
        if metric != EVAL_METRIC and metric[len(EVAL_METRIC) + 1 :] not in evaluated:
            choices = ", ".join(repr(f"{EVAL_METRIC}/{name}") for name in evaluated)
            raise ValueError(f"search.metric {metric!r} names no eval dataset; use {EVAL_METRIC!r} or one of {choices}")
        every = self.template.evaluation.every_steps
        checkpoint_every = self.template.training.checkpoint_every
        if every is not None and checkpoint_every % every:
            # Tune needs the metric in every report, and a checkpoint's report carries only an eval run at its step.
            raise ValueError(
                f"template.evaluation.every_steps ({every}) must divide template.training.checkpoint_every "
                f"({checkpoint_every}) when search.metric is {metric!r}: trials are compared at checkpoints, on an "
                f"evaluation of that step; leave every_steps null to evaluate at every checkpoint"
            )
        return self


class Sweep(Strict):
    apiVersion: Literal["sana-ray/v1"]
    kind: Literal["Sweep"]
    metadata: Metadata
    spec: SweepSpec

    def template_manifest(self) -> Manifest:
        """The template as a TrainingRun manifest (named after the sweep)."""
        return Manifest.model_validate(
            {"apiVersion": API_VERSION, "kind": "TrainingRun", "metadata": self.metadata.model_dump(mode="json"),
             "spec": self.spec.template.model_dump(mode="json")}
        )


def path_segments(path: str) -> list[str | int]:
    """``training.optimizer.lr`` -> ["training", "optimizer", "lr"] (relative to the template spec)."""
    # (ASCII digits only, and short: int() refuses 4,300+ digits, and no list is that long anyway.)
    return [int(p) if p.isascii() and p.isdigit() and len(p) <= 6 else p for p in path.split(".")]


def trial_manifest_data(template: dict, values: dict[str, Any]) -> dict:
    """A TrainingRun document (plain data): ``template`` (a TrainingRun document) with ``values`` set."""
    data = copy.deepcopy(template)
    for path, value in values.items():
        apply_override(data, ["spec", *path_segments(path)], value, f"{path}={value}")
    return data


def check_space(sweep_data: dict, search: SearchSpec, file: str, position: Callable[[tuple, str], tuple]) -> list[Problem]:
    """Validate the template with every bound / listed value of every searched path set in turn.

    ``sweep_data`` is the sweep document as plain data (overrides applied). Returns the problems,
    each naming ``spec.search.space.<path>``, the value and what is wrong with it.
    """
    problems: list[Problem] = []
    template = {
        "apiVersion": sweep_data.get("apiVersion"),
        "kind": "TrainingRun",
        "metadata": sweep_data.get("metadata"),
        "spec": sweep_data["spec"]["template"],
    }
    for path, domain in search.space.items():
        loc = ("spec", "search", "space", path)
        line, column = position(loc, "")
        where = format_path(loc)
        if not path.startswith(SEARCHABLE_PREFIXES) or path.strip(".") != path or ".." in path:
            problems.append(Problem(file, line, column, where, f"'{path}' cannot be searched",
                                    "search paths are under training. (e.g. training.optimizer.lr, training.flow_shift)"))
            continue
        for value in domain.extremes():
            try:
                Manifest.model_validate(trial_manifest_data(template, {path: value}))
            except ManifestError as error:
                problems += [Problem(file, line, column, where, f"value {shorten(repr(value))}: {p.message}", p.hint) for p in error.problems]
            except ValidationError as error:
                for p in problems_from_validation_error(error, Manifest, file, lambda _loc, _kind: (None, None)):
                    problems.append(Problem(file, line, column, where,
                                            f"{domain.kind} value {shorten(repr(value))} makes {p.path} invalid: {p.message}", p.hint))
    return problems
