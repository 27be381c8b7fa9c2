"""``hf-distill search``: hyperparameter search (Optuna, Ray Tune) over trials of the run the flags describe."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from .parsing import UsageError, _cli_defaults, _parse, _parser, load_config_file
from .train import _count, build_trainer


@dataclasses.dataclass
class SearchArguments:
    _cli_group = "search"

    n_trials: int = dataclasses.field(default=10, metadata={"help": "Trials to run (each a full training run)."})
    backend: str = dataclasses.field(
        default="optuna", metadata={"help": "Search engine: `optuna` (TPE, pip install 'hf_distill[optuna]') or `ray` "
                                    "(Ray Tune, pip install 'hf_distill[ray]').", "choices": ["optuna", "ray"]})
    search_space: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": "A YAML/JSON file mapping arguments to ranges or choices (or a `search_space:` mapping in "
                  "--config), e.g. `temperature: {low: 1, high: 8}`, `learning_rate: {low: 1e-4, high: 1e-2, log: "
                  "true}`, `per_device_train_batch_size: [32, 64]`. Default: the learning rate (x0.1 to x10) and "
                  "the method's own weights."})
    search_metric: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "Evaluation metric to optimise (default: eval_accuracy, or for feature "
                                "distillation eval_knn_accuracy, else eval_feature_cosine; a loss is minimised)."})
    search_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the sampler (Optuna's TPE, Ray Tune's "
                                                                "random search)."})


def _search_main(argv: Sequence[str]) -> int:
    """``hf-distill search``: trials of the training run the arguments describe, with the searched values."""
    from ..search import SearchSpace, check_backend

    parser = _parser((SearchArguments,), prog="hf-distill search",
                     description="Search hyperparameters (distillation and Trainer arguments) over trials of the run "
                     "the other flags describe; each trial trains a fresh student against the same, once-loaded "
                     "teacher. Writes search_results.json and best.yaml (the run with the best values) to "
                     "--output_dir.")
    (model_args, data_args, training_args, search_args, _), given = _parse(parser, argv)
    _cli_defaults(training_args, given)
    try:
        check_backend(search_args.backend)
    except ImportError as err:
        raise UsageError(f"--backend {search_args.backend}: {err}") from None
    space = search_args.search_space
    if isinstance(space, str):
        space = _inline_or_file(space, "--search_space")
    if space is not None:
        try:
            SearchSpace.from_dict(space, type(training_args))
        except ValueError as err:
            raise UsageError(str(err)) from None
    if search_args.n_trials < 1:
        raise UsageError("--n_trials must be at least 1")
    trainer, train, evaluation = build_trainer(model_args, data_args, training_args, print, model_init=True)
    print(f"searching {search_args.n_trials} trials of {model_args.student_model_name_or_path} with "
          f"{training_args.distill_method} ({search_args.backend}) on {_count(train)}; evaluating on {_count(evaluation)}")
    kwargs = {}
    if search_args.backend == "optuna":
        import optuna

        kwargs["sampler"] = optuna.samplers.TPESampler(seed=search_args.search_seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        kwargs["search_alg"] = BasicVariantGenerator(random_state=search_args.search_seed)
    best = trainer.hyperparameter_search(hp_space=space, n_trials=search_args.n_trials, backend=search_args.backend,
                                         metric=search_args.search_metric, **kwargs)
    trials = trainer.search_trials or [  # Ray Tune: the trials ran in its workers
        {"trial": i, "params": {k: t.config[k] for k in best.hyperparameters}, "objective": t.last_result.get("objective"),
         "metrics": {k: v for k, v in t.last_result.items() if k.startswith("eval_")}}
        for i, t in enumerate(best.run_summary.trials)]
    for t in trials:
        print(f"trial {t['trial']}: objective {_fmt(t['objective'])}  " + "  ".join(
            f"{k}={_fmt(v)}" for k, v in t["params"].items()))
    print(f"best: objective {_fmt(best.objective)}  " + "  ".join(
        f"{k}={_fmt(v)}" for k, v in best.hyperparameters.items()))
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"backend": search_args.backend, "best": {"objective": best.objective,
                                                        "hyperparameters": best.hyperparameters}, "trials": trials}
    (out / "search_results.json").write_text(json.dumps(results, indent=2, default=str))
    best_config = {**_given_values((model_args, data_args, training_args), given), **best.hyperparameters,
                   "output_dir": str(out / "best")}
    import yaml

    (out / "best.yaml").write_text("# the searched run with the best trial's values (hf-distill search)\n"
                                   + yaml.safe_dump(best_config, sort_keys=False))
    print(f"results in {out / 'search_results.json'}; train with the best values: "
          f"hf-distill --config {out / 'best.yaml'}")
    return 0


def _inline_or_file(text: str, flag: str) -> dict:
    """A mapping given inline (YAML / JSON text) or as a file."""
    if not os.path.exists(text) and text.lstrip().startswith("{"):
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"{flag}: not valid YAML / JSON: {str(err).splitlines()[0]}") from None
        if isinstance(value, dict):
            return value
    return load_config_file(text, flag)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _given_values(groups, given: set[str]) -> dict:
    """The arguments the user set (config file and flags), as plain values for a config file."""
    import enum

    values = {}
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name in given:
                value = getattr(group, f.name)
                if f.name == "report_to" and not value:
                    value = "none"  # as a user writes it (the Trainer turns it into [])
                values[f.name] = value.value if isinstance(value, enum.Enum) else value
    return values
