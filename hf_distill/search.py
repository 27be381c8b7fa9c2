"""Hyperparameter search spaces and objectives for ``DistillationTrainer.hyperparameter_search``.

A search space maps argument names of :class:`~hf_distill.DistillationTrainingArguments` to a
range or a list, the same in Python and in a config file's ``search_space:``::

    temperature: {low: 1, high: 8}                      # float, uniform
    learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
    dkd_beta: {low: 0.5, high: 8, log: true}
    num_train_epochs: {low: 2, high: 6}                 # int: the argument is an int
    per_device_train_batch_size: {choices: [32, 64]}
    lr_scheduler_type: [cosine, linear]                 # a plain list: choices

Whether a range is of integers or floats follows the argument's own type; ``step`` quantises
it. The space becomes Optuna ``trial.suggest_*`` calls or Ray Tune ``tune.*`` samplers, so the
Trainer's own search engines run it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Callable, Mapping

# what a search maximises by default, by what the method reports (first present wins)
OBJECTIVE_METRICS = ("eval_accuracy", "eval_knn_accuracy", "eval_feature_cosine")
BACKENDS = ("optuna", "ray")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float", "int" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def ray_sampler(self):
        """The Ray Tune sampler of the same distribution."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.choices))
        if self.kind == "int":
            if self.step and self.step != 1:
                return tune.qrandint(int(self.low), int(self.high), int(self.step))
            return (tune.lograndint if self.log else tune.randint)(int(self.low), int(self.high) + 1)
        if self.step:
            return (tune.qloguniform if self.log else tune.quniform)(self.low, self.high, self.step)
        return (tune.loguniform if self.log else tune.uniform)(self.low, self.high)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "") + (
            f" step {self.step:g}" if self.step else "")


class SearchSpace:
    """Named ranges and choices over the arguments of ``args_class``, checked when built."""

    def __init__(self, params: list[Param]):
        self.params = params

    @classmethod
    def from_dict(cls, space: Mapping[str, Any], args_class: type) -> "SearchSpace":
        if not isinstance(space, Mapping) or not space:
            raise ValueError("search_space must map argument names to ranges ({low: 1, high: 8}) or choices "
                             "({choices: [a, b]} or a list)")
        types = {f.name: f.type for f in dataclasses.fields(args_class)}
        hints = typing.get_type_hints(args_class)
        params = []
        for name, spec in space.items():
            if name not in types:
                close = difflib.get_close_matches(name, types, n=1)
                raise ValueError(f"search_space: '{name}' is not an argument" +
                                 (f" (did you mean {close[0]}?)" if close else ""))
            params.append(_param(name, spec, hints.get(name)))
        return cls(params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def optuna_space(self) -> Callable:
        return lambda trial: {p.name: p.suggest(trial) for p in self.params}

    def ray_space(self) -> Callable:
        # the Trainer calls hp_space(None) once for Ray: the config of samplers
        return lambda trial=None: {p.name: p.ray_sampler() for p in self.params}

    def for_backend(self, backend: str) -> Callable:
        return self.optuna_space() if backend == "optuna" else self.ray_space()

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.params)


def _param(name: str, spec: Any, annotation) -> Param:
    if isinstance(spec, (list, tuple)):
        spec = {"choices": list(spec)}
    if not isinstance(spec, Mapping):
        raise ValueError(f"search_space: {name}: give {{low: ..., high: ...}} or {{choices: [...]}}, got {spec!r}")
    unknown = set(spec) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise ValueError(f"search_space: {name}: unknown key(s) {sorted(unknown)}; use low, high, log, step or "
                         "choices")
    if "choices" in spec:
        if not isinstance(spec["choices"], (list, tuple)) or not spec["choices"]:
            raise ValueError(f"search_space: {name}: choices must be a non-empty list")
        return Param(name, "choice", choices=tuple(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"search_space: {name}: a range needs low and high")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (TypeError, ValueError):
        raise ValueError(f"search_space: {name}: low and high must be numbers") from None
    log = bool(spec.get("log", False))
    step = float(spec["step"]) if spec.get("step") is not None else None
    if not low < high:
        raise ValueError(f"search_space: {name}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise ValueError(f"search_space: {name}: a log range needs low > 0")
    if log and step:
        raise ValueError(f"search_space: {name}: choose log or step, not both")
    kind = "int" if _is_int(annotation) else "float"
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ValueError(f"search_space: {name} is an integer argument: low and high must be integers")
    if not math.isfinite(low) or not math.isfinite(high):
        raise ValueError(f"search_space: {name}: low and high must be finite")
    return Param(name, kind, low, high, log, step)


def _is_int(annotation) -> bool:
    if annotation is int:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]  # Optional[int]
    return args == [int]


def default_search_space(method, args) -> dict[str, dict]:
    """The learning rate (a decade either side of the given one) and the method's own weights."""
    lr = float(args.learning_rate)
    return {"learning_rate": {"low": lr / 10, "high": lr * 10, "log": True}, **method.search_space}


def objective_metric(metrics: Mapping[str, float]) -> str:
    """The metric a default search maximises: the student's accuracy (or, label-free, k-NN accuracy, else
    the cosine to the teacher's features)."""
    for name in OBJECTIVE_METRICS:
        if name in metrics:
            return name
    raise ValueError(f"none of {', '.join(OBJECTIVE_METRICS)} in the evaluation metrics ({sorted(metrics)}): "
                     "give the metric to optimise (metric=, --search_metric) or a compute_objective")


def metric_objective(metric: str | None) -> tuple[Callable[[Mapping[str, float]], float], str]:
    """(compute_objective, direction) for a metric name (``eval_`` optional), or the default one."""
    if metric is None:
        return (lambda metrics: float(metrics[objective_metric(metrics)])), "maximize"
    name = metric if metric.startswith("eval_") else f"eval_{metric}"

    def objective(metrics):
        if name not in metrics:
            raise ValueError(f"the search metric {name} is not among the evaluation metrics ({sorted(metrics)})")
        return float(metrics[name])

    return objective, "minimize" if "loss" in name else "maximize"


def available_backend() -> str:
    import importlib.util

    for backend, module in (("optuna", "optuna"), ("ray", "ray.tune")):
        try:
            if importlib.util.find_spec(module) is not None:
                return backend
        except ModuleNotFoundError:
            continue
    raise ImportError("hyperparameter search needs Optuna or Ray Tune: pip install 'hf_distill[optuna]' (or "
                      "'hf_distill[ray]')")


def check_backend(backend: str) -> None:
    import importlib.util

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    module = "optuna" if backend == "optuna" else "ray"
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the {backend} backend is not installed: pip install 'hf_distill[{backend}]'")


def trial_params(backend, hp_space, trial) -> dict[str, Any]:
    """The argument values a trial sets (Optuna: drawn from ``hp_space``; Ray Tune: the trial's config)."""
    from transformers.trainer_utils import HPSearchBackend

    if backend == HPSearchBackend.OPTUNA:
        return dict(hp_space(trial))
    return {k: v for k, v in dict(trial).items() if k != "wandb"}


def apply_params(args, params: Mapping[str, Any], defaults: dict) -> None:
    """Set a trial's values on ``args`` (cast as the Trainer casts them), remembering in ``defaults`` the values
    they replace, and check the result as a whole."""
    from .methods import get_method

    for key, value in params.items():
        if not hasattr(args, key):
            raise ValueError(f"the search space sets '{key}', which is not an argument of "
                             "DistillationTrainingArguments")
        old = getattr(args, key)
        defaults.setdefault(key, old)
        if old is not None and not isinstance(old, bool) and isinstance(old, (int, float, str)):
            value = type(old)(value)
        setattr(args, key, value)
    if "alpha" in params and not get_method(args.distill_method).uses_alpha:
        raise ValueError(f"the search space sets alpha, which distill_method='{args.distill_method}' does not use")
    args.check_distillation()


class TrialRecords:
    """Each trial's parameters and metrics (``DistillationTrainer.search_trials``): every evaluation of a trial
    reports here through the objective; the trial's last evaluation is the one kept."""

    def __init__(self, compute_objective, state):
        self.compute_objective, self.state = compute_objective, state  # state(): the Trainer's current state
        self.entries: list[dict] = []
        self.params: dict | None = {}  # the running trial's parameters; None once its first evaluation is in

    def start(self, params: dict) -> None:
        self.params = dict(params)

    def __call__(self, metrics) -> float:
        value = self.compute_objective(metrics)
        first = self.params is not None
        entry = {"trial": len(self.entries) - (0 if first else 1),
                 "params": dict(self.params if first else self.entries[-1]["params"]),
                 "step": self.state().global_step, "metrics": dict(metrics), "objective": value}
        if first:
            self.entries.append(entry)
            self.params = None  # later evaluations of this trial replace its entry
        else:
            self.entries[-1] = entry
        return value
