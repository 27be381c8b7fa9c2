"""Hyperparameter search: search spaces, model_init, Optuna and Ray Tune trials on digits."""

import importlib.util
import os

import pytest
import torch
from conftest import tiny_spec, tiny_timm

import hf_distill.methods.kd as kd_module
import hf_distill.trainer as trainer_module
from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.data import with_image_transform
from hf_distill.models import save_native
from hf_distill.search import SearchSpace, default_search_space, metric_objective

SPACE = {"temperature": {"low": 1.0, "high": 8.0}, "alpha": {"low": 0.1, "high": 0.9}}


# ---------------------------------------------------------------------------------------------- spaces
def test_a_search_space_takes_its_types_from_the_arguments_and_checks_itself():
    space = SearchSpace.from_dict({"temperature": {"low": 1, "high": 8}, "num_train_epochs": {"low": 1, "high": 3},
                                   "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                   "per_device_train_batch_size": [16, 32]}, DistillationTrainingArguments)
    kinds = {p.name: p.kind for p in space.params}
    # num_train_epochs is a float argument in transformers; per_device_train_batch_size an int given as choices
    assert kinds == {"temperature": "float", "num_train_epochs": "float", "learning_rate": "float",
                     "per_device_train_batch_size": "choice"}
    ints = SearchSpace.from_dict({"save_total_limit": {"low": 1, "high": 4}, "dkd_warmup_epochs": {"low": 0, "high": 5}},
                                 DistillationTrainingArguments)
    assert [p.kind for p in ints.params] == ["int", "float"]  # Optional[int], float
    bad = {
        "temperatur": "'temperatur' is not an argument \\(did you mean temperature\\?\\)",
        "temperature_low": None,
    }
    with pytest.raises(ValueError, match=bad["temperatur"]):
        SearchSpace.from_dict({"temperatur": {"low": 1, "high": 2}}, DistillationTrainingArguments)
    for spec, message in [({"low": 2, "high": 1}, "low \\(2\\) must be below high \\(1\\)"),
                          ({"low": 0, "high": 1, "log": True}, "a log range needs low > 0"),
                          ({"low": 1}, "a range needs low and high"),
                          ({"min": 1, "max": 2}, "unknown key\\(s\\) \\['max', 'min'\\]"),
                          ({"choices": []}, "choices must be a non-empty list"),
                          ("fast", "give \\{low: ..., high: ...\\} or \\{choices: \\[...\\]\\}")]:
        with pytest.raises(ValueError, match=message):
            SearchSpace.from_dict({"temperature": spec}, DistillationTrainingArguments)
    with pytest.raises(ValueError, match="integer argument: low and high must be integers"):
        SearchSpace.from_dict({"save_total_limit": {"low": 1.5, "high": 3}}, DistillationTrainingArguments)


def test_optuna_draws_inside_the_ranges():
    optuna = pytest.importorskip("optuna")
    space = SearchSpace.from_dict({**SPACE, "save_total_limit": {"low": 1, "high": 3},
                                   "lr_scheduler_type": ["linear", "cosine"]}, DistillationTrainingArguments)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = space.optuna_space()(study.ask())
        assert 1 <= values["temperature"] <= 8 and 0.1 <= values["alpha"] <= 0.9
        assert values["save_total_limit"] in (1, 2, 3) and values["lr_scheduler_type"] in ("linear", "cosine")


def test_default_spaces_and_objectives(make_args):
    from hf_distill.methods import METHODS

    args = make_args(learning_rate=1e-3)
    for name, method in METHODS.items():
        space = default_search_space(method, args)
        assert space["learning_rate"] == {"low": 1e-4, "high": 1e-2, "log": True}
        SearchSpace.from_dict(space, DistillationTrainingArguments)  # every default space is valid
        if not method.uses_alpha:  # a trial setting alpha would be refused
            assert "alpha" not in space
    assert set(default_search_space(METHODS["dkd"], args)) == {"learning_rate", "temperature", "dkd_beta"}
    objective, direction = metric_objective(None)
    assert direction == "maximize" and objective({"eval_loss": 1.0, "eval_accuracy": 0.7,
                                                  "eval_teacher_accuracy": 0.9}) == 0.7
    assert objective({"eval_feature_cosine": 0.5, "eval_knn_accuracy": 0.6}) == 0.6
    objective, direction = metric_objective("loss")
    assert direction == "minimize" and objective({"eval_loss": 1.5, "eval_accuracy": 0.7}) == 1.5
    with pytest.raises(ValueError, match="none of eval_accuracy"):
        metric_objective(None)[0]({"eval_loss": 1.0})


# ---------------------------------------------------------------------------------------------- trials
SPEC = tiny_spec()


@pytest.fixture(scope="module")
def search_data(digits, tmp_path_factory):
    train = with_image_transform(digits["train"].select(range(96)), SPEC)
    evaluation = with_image_transform(digits["test"].select(range(48)), SPEC)
    teacher_dir = tmp_path_factory.mktemp("teacher")
    save_native(tiny_timm("resnet18", seed=2, spec=SPEC), str(teacher_dir))
    return train, evaluation, str(teacher_dir)


def _student():
    return tiny_timm(seed=1, spec=SPEC)


def _trainer(search_data, tmp_path, **kw):
    train, evaluation, teacher_dir = search_data
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "search"), per_device_train_batch_size=16, per_device_eval_batch_size=48,
        learning_rate=1e-2, max_steps=3, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, teacher_model_name_or_path=[teacher_dir], **kw)
    return DistillationTrainer(model_init=_student, args=args, train_dataset=train, eval_dataset=evaluation)


def test_model_init_trains_a_fresh_student_and_refuses_model_too(search_data, tmp_path):
    trainer = _trainer(search_data, tmp_path)
    first = trainer.student
    trainer.train()
    assert trainer.student is not first  # the Trainer rebuilt it for training
    trained = trainer.student
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ValueError, match="model=.*or as `model_init=`.*one of them"):
        DistillationTrainer(model=_student(), model_init=_student, args=trainer.args)


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed (hf_distill[optuna])")
def test_optuna_trials_use_their_values_load_the_teacher_once_and_report_the_best(search_data, tmp_path,
                                                                                 monkeypatch):
    loaded = []
    real_load = trainer_module.load_model
    monkeypatch.setattr(trainer_module, "load_model", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    used = []  # (temperature, alpha) as the KD loss received them, every step
    real_kd = kd_module.kd_loss
    monkeypatch.setattr(kd_module, "kd_loss", lambda s, t, y, temp, alpha, *rest: used.append((temp, alpha))
                        or real_kd(s, t, y, temp, alpha, *rest))
    containers = []  # each trial's trained container: a fresh student every time

    trainer = _trainer(search_data, tmp_path)
    assert loaded == [search_data[2]]
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            containers.append((id(model.student), args.temperature))

    trainer.add_callback(Seen())
    import optuna

    best = trainer.hyperparameter_search(hp_space=SPACE, n_trials=3, backend="optuna",
                                         sampler=optuna.samplers.RandomSampler(seed=0))
    assert loaded == [search_data[2]]  # the teacher was loaded once, for all trials
    trials = trainer.search_trials
    assert len(trials) == 3 and len({t["params"]["temperature"] for t in trials}) == 3
    for i, trial in enumerate(trials):
        # each trial's 3 steps computed the KD loss with that trial's temperature and alpha
        assert used[3 * i: 3 * i + 3] == [(trial["params"]["temperature"], trial["params"]["alpha"])] * 3
        assert 0 <= trial["metrics"]["eval_accuracy"] <= 1 and "eval_teacher_accuracy" in trial["metrics"]
        assert trial["objective"] == trial["metrics"]["eval_accuracy"]
    assert len({c[0] for c in containers}) == 3 and [c[1] for c in containers] == [
        t["params"]["temperature"] for t in trials]
    top = max(trials, key=lambda t: t["objective"])
    assert best.objective == top["objective"] and best.hyperparameters == top["params"]
    assert trainer.args.temperature == 4.0 and trainer.args.alpha == 0.9  # the arguments are restored


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed (hf_distill[optuna])")
@pytest.mark.filterwarnings("ignore:.*(GridSampler|categorical distribution).*:UserWarning")  # list-valued choices
def test_a_trial_rebuilds_the_extra_modules_for_its_arguments(search_data, tmp_path):
    """FitNets: the regressor is rebuilt per trial (a fresh module), for the trial's hint layer."""
    import optuna

    trainer = _trainer(search_data, tmp_path, distill_method="fitnets", hint_layers=["layer1:layer1"])
    built = []
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            built.append((args.hint_layers, id(model.extras), {k: tuple(p.shape) for k, p in
                                                                 model.extras.named_parameters()}))

    trainer.add_callback(Seen())
    trainer.hyperparameter_search(hp_space={"hint_layers": [["layer1:layer1"], ["layer2:layer2"]]}, n_trials=4,
                                  backend="optuna", sampler=optuna.samplers.GridSampler(
                                      {"hint_layers": [["layer1:layer1"], ["layer2:layer2"]]}))
    layers = {tuple(b[0]): b[2] for b in built}
    assert len({b[1] for b in built}) == len(built)  # new extra modules every trial
    assert set(layers) == {("layer1:layer1",), ("layer2:layer2",)} and layers[("layer1:layer1",)] != layers[
        ("layer2:layer2",)]  # the regressor follows the trial's layers


def test_search_refuses_what_it_cannot_do(search_data, tmp_path, make_args):
    train, evaluation, teacher_dir = search_data
    trainer = DistillationTrainer(model=_student(), args=make_args(teacher_model_name_or_path=[teacher_dir]),
                                  train_dataset=train, eval_dataset=evaluation)
    with pytest.raises(ValueError, match="pass it as model_init="):
        trainer.hyperparameter_search(hp_space=SPACE, n_trials=1)
    trainer = _trainer(search_data, tmp_path, distill_method="dkd")
    if importlib.util.find_spec("optuna") is not None:
        with pytest.raises(ValueError, match="sets alpha, which distill_method='dkd' does not use"):
            trainer.hyperparameter_search(hp_space=SPACE, n_trials=1, backend="optuna")
    with pytest.raises(ValueError, match="backend must be one of optuna, ray"):
        trainer.hyperparameter_search(hp_space=SPACE, n_trials=1, backend="wandb")


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Tune not installed (hf_distill[ray])")
def test_ray_tune_runs_the_same_search(search_data, tmp_path):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the trial workers unpickle the trainer, whose model_init lives in this test module
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
                                       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        trainer = _trainer(search_data, tmp_path)
        best = trainer.hyperparameter_search(hp_space=SPACE, n_trials=2, backend="ray",
                                             resources_per_trial={"cpu": 1})
        results = [t.last_result for t in best.run_summary.trials]
    finally:
        ray.shutdown()
    assert len(results) == 2 and all(0 <= r["eval_accuracy"] <= 1 and "eval_teacher_accuracy" in r for r in results)
    assert best.objective == max(r["objective"] for r in results) and set(best.hyperparameters) == set(SPACE)
    assert trainer.student is not None  # the trainer is usable after the search
