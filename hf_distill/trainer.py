"""``DistillationTrainer``: a ``transformers.Trainer`` that distills any image classifier into another."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import DistillationTrainingArguments
from .callbacks import SetEpochCallback
from .data import class_names_for, collate_images
from .inert import inert_settings
from .losses import perturb_logits
from .methods import Progress, StepOutputs, get_method
from .cards import CardContext, build_model_card, measure_latency_ms, run_record
from .preprocessing import with_own_teacher_accuracy
from .models import (
    call_model,
    count_parameters,
    display_name,
    distillation_heads,
    forward_images,
    input_spec,
    is_transformers_model,
    label_names_of,
    load_model,
    load_native_weights,
    model_family,
    save_native,
    set_label_names,
    short_name,
)
from .models.features import backbone_features, export_backbone, feature_shapes, knn_accuracy
from .models.taps import FeatureTaps, probe_features
from .teacher import Teachers, check_label_spaces

logger = logging.getLogger(__name__)

EXTRA_MODULES_NAME = "distill_modules.safetensors"


class DistillationModel(nn.Module):
    """The student plus the method's extra trainable modules (regressors, exits, branches).

    This is what the Trainer optimises, wraps for data parallel and checkpoints, so the extra
    modules are trained, gradient-synced and resumed exactly like the student. Only
    ``student`` is exported.
    """

    # The Trainer reads ``model.config`` (label smoothing, use_cache); the container has none of its own.
    config = None

    def __init__(self, student: nn.Module, extras: nn.ModuleDict, method, layers: Sequence[str] = ()):
        super().__init__()
        self.student = student
        self.extras = extras
        self._method = method  # plain attributes: not modules, not saved
        self._taps = FeatureTaps(student, layers) if layers else None
        self._heads = distillation_heads(student)  # a DeiT-style student: class and distillation heads

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """``--gradient_checkpointing`` / ``--activation_checkpointing``: recompute the student's
        activations in the backward pass (timm ``set_grad_checkpointing``, transformers'
        ``gradient_checkpointing_enable``). Teachers keep no activations anyway (no autograd)."""
        student = self.student
        if is_transformers_model(student):
            if not getattr(student, "supports_gradient_checkpointing", False):
                raise ValueError(f"gradient_checkpointing: {type(student).__name__} does not support it")
            if hasattr(student, "activation_checkpointing_enable"):
                student.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                        every_n_layers=every_n_layers, offload=offload)
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        elif hasattr(student, "set_grad_checkpointing"):  # timm
            if activation_checkpointing_kwargs or every_n_layers != 1 or offload:
                raise ValueError("gradient_checkpointing_kwargs: timm students take no options "
                                 "(timm's set_grad_checkpointing checkpoints every block)")
            student.set_grad_checkpointing(True)
        else:
            raise ValueError(f"gradient_checkpointing: the student ({type(student).__name__}) is neither a timm nor a "
                             "transformers model, so it has no checkpointing switch; wrap its blocks in "
                             "torch.utils.checkpoint yourself")

    gradient_checkpointing_enable = activation_checkpointing_enable

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                features_only: bool = False) -> dict[str, Any]:
        """``features_only``: run the student only up to its last tapped layer (logits None)."""
        weight = next(self.student.parameters(), None)
        if weight is not None and weight.is_floating_point() and pixel_values.dtype != weight.dtype:
            pixel_values = pixel_values.to(weight.dtype)  # --bf16_full_eval / --fp16_full_eval cast the student
        heads = {}
        if self._method.student_output == "features":  # backbone features, no class logits
            summary, spatial = backbone_features(self.student, pixel_values)
            features = {"summary": summary, "spatial": spatial}
            extra = self._method.forward_modules(self.extras, features) if len(self.extras) else {}
            return {"logits": None, "features": features, "extra": extra, "heads": heads}
        if features_only and self._taps is not None:
            logits, features = None, self._taps.run_until_complete(call_model, self.student, pixel_values)
        else:
            if self._heads is not None:
                # training: the class head learns the labels, the distillation head the teacher; evaluation
                # and export predict with their mean, as timm and transformers do
                cls, dist = self._heads(pixel_values)
                logits = cls if self.training else (cls + dist) / 2
                heads = {"cls_head": cls, "dist_head": dist}
            else:
                logits = call_model(self.student, pixel_values)
            features = self._taps.pop() if self._taps is not None else {}
        extra = self._method.forward_modules(self.extras, features) if len(self.extras) else {}
        return {"logits": logits, "features": features, "extra": extra, "heads": heads}


def _load_accuracy():
    """``evaluate``'s accuracy metric, or None where it cannot be fetched (offline, first use)."""
    try:
        import evaluate

        return evaluate.load("accuracy")
    except Exception as err:  # evaluate fetches metric scripts from the Hub on first use
        logger.info("evaluate.load('accuracy') unavailable (%s); computing accuracy locally", type(err).__name__)
        return None


_ACCURACY = None


def _concat(value):
    # with eval_do_concat_batches=False the Trainer hands over a list of per-batch arrays
    if isinstance(value, list):
        return np.concatenate([np.asarray(v) for v in value])
    return np.asarray(value)


def _accuracy(logits, labels) -> float:
    global _ACCURACY
    pred_ids = _concat(logits).argmax(-1)
    labels = _concat(labels)
    if _ACCURACY is None:
        _ACCURACY = _load_accuracy() or False
    if _ACCURACY:
        return float(_ACCURACY.compute(predictions=pred_ids, references=labels)["accuracy"])
    return float((pred_ids == labels).mean())


def _length(dataset) -> int | None:
    return len(dataset) if hasattr(dataset, "__len__") else None  # a stream has none


def teacher_metrics(student_logits: np.ndarray, teacher_logits: np.ndarray, labels=None) -> dict[str, float]:
    """The teacher's accuracy (with labels), and how far the student follows it: top-1 agreement and the
    mean ``KL(teacher || student)`` at temperature 1."""
    s, t = np.asarray(student_logits, dtype=np.float64), np.asarray(teacher_logits, dtype=np.float64)
    if s.shape != t.shape:
        raise RuntimeError(f"teacher logits {t.shape} do not line up with the student's {s.shape}")

    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_ps, log_pt = log_softmax(s), log_softmax(t)
    metrics = {"teacher_agreement": float((s.argmax(-1) == t.argmax(-1)).mean()),
               "teacher_kl": float((np.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean())}
    if labels is not None:
        metrics["teacher_accuracy"] = float((t.argmax(-1) == _concat(labels)).mean())
    return metrics


def feature_metrics(eval_pred, names: Sequence[str]) -> dict[str, float]:
    """Means of per-sample values (one column per name), and ``feature_cosine``: the mean of the cosines."""
    values = _concat(eval_pred.predictions)
    metrics = {name: float(values[:, i].mean()) for i, name in enumerate(names)}
    cosines = [v for k, v in metrics.items() if k.startswith("feature_cosine_")]
    if cosines:
        metrics["feature_cosine"] = float(np.mean(cosines))
    return metrics


def accuracy_metrics(eval_pred, names: Sequence[str] = ()) -> dict[str, float]:
    """Default ``compute_metrics``: top-1 accuracy of the student (and of named extra outputs)."""
    preds = eval_pred.predictions
    if eval_pred.label_ids is None:  # unlabelled evaluation data: nothing to score
        return {}
    if isinstance(preds, list) and preds and isinstance(preds[0], (tuple, list)):  # per batch, several outputs
        preds = tuple(list(p) for p in zip(*preds))
    elif not isinstance(preds, tuple):
        preds = (preds,)
    metrics = {"accuracy": _accuracy(preds[0], eval_pred.label_ids)}
    for name, logits in zip(names, preds[1:]):
        metrics[f"{name}_accuracy"] = _accuracy(logits, eval_pred.label_ids)
    return metrics


class DistillationTrainer(Trainer):
    """Distill a teacher (or the student itself) into a student with any method of :mod:`hf_distill.methods`.

    Args:
        model: the student: a timm model, a transformers ``*ForImageClassification`` model,
            any ``nn.Module`` returning logits, or a name for :func:`~hf_distill.load_model`.
        teacher_model: a teacher module (or a list of them). ``None`` loads
            ``args.teacher_model_name_or_path``.
        args: :class:`DistillationTrainingArguments`.
        knn_train_dataset: feature distillation: a labelled dataset whose student (and teacher) summary
            features are the k-NN classifier's memory, to report ``eval_knn_accuracy`` on a labelled
            evaluation set (DINO's weighted k-NN, k = 20, cosine).
        Everything else is passed to ``transformers.Trainer``. ``data_collator`` defaults to
        stacking ``pixel_values``/``labels`` and ``compute_metrics`` to accuracy.
    """

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | Sequence[nn.Module] | None = None,
        args: DistillationTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        knn_train_dataset=None,
        model_init=None,
        **kwargs,
    ):
        if args is None:
            args = DistillationTrainingArguments(output_dir="hf_distill_output")
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError("args must be DistillationTrainingArguments (it extends TrainingArguments)")
        if (model is None) == (model_init is None):
            raise ValueError("pass the student as `model=` (a module or a name for load_model), or as `model_init=` "
                             "(a function returning a fresh student, for hyperparameter_search): one of them")
        self._student_init = model_init
        if model_init is not None:
            set_seed(args.seed)  # as the Trainer does before a model_init: the same student for the same seed
            student = self._new_student(None)
        else:
            student = load_model(model) if isinstance(model, str) else model
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func is not supported: the distillation method computes the loss "
                             "(DistillationTrainer.compute_loss); choose or add a method instead")
        if args.batch_eval_metrics and compute_metrics is None:
            raise ValueError("batch_eval_metrics needs a compute_metrics that accepts compute_result; the default "
                             "accuracy metric scores the whole evaluation set at once")

        from .teacher_cache import TeacherCacheDataset

        if not args.teacher_cache_dir and isinstance(train_dataset, TeacherCacheDataset):
            # train_dataset=with_teacher_cache(...) names its cache: where the teacher's outputs come from is
            # decided here, once, and the cache is checked like a named one (a live teacher must be the cache's)
            args.teacher_cache_dir = str(train_dataset.cache.cache_dir)
        self.method = get_method(args.distill_method)(args)
        teachers = self._resolve_teachers(teacher_model, args)
        if self.method.needs_teacher and not teachers and not args.teacher_cache_dir:
            raise ValueError(
                f"distill_method='{args.distill_method}' needs a teacher: pass teacher_model= or set "
                "teacher_model_name_or_path"
            )
        self.teacher_cache = self._check_teacher_cache(args, teachers, train_dataset)
        best = str(args.metric_for_best_model or "")
        if self.method.student_output == "features" and not teachers and best.removeprefix("eval_").startswith(
                "feature_cosine"):
            raise ValueError(f"metric_for_best_model='{best}' compares the student with the teachers on the evaluation "
                             "set, and none is given (trained from a feature cache): pass teacher_model= as well, or "
                             "knn_train_dataset= with metric_for_best_model='knn_accuracy'")
        if self.method.student_output == "logits":  # feature distillation has no label space
            set_label_names(student, class_names_for(student, train_dataset, teachers))  # as the CLI does
            check_label_spaces(student, teachers)
        self._raw_train_dataset = train_dataset  # as given: each search trial derives its own reading of it
        train_dataset = self._training_data(args, student, teachers)
        self._stream_reading(args, train_dataset)
        self.knn_train_dataset = knn_train_dataset
        self._teacher_knn: dict[tuple, dict[str, float]] = {}
        self.teachers = Teachers(teachers, input_spec(student))
        # evaluation: the teachers' logits per example (keyed by its pixels), computed once; those of the running
        # evaluation
        self._eval_teacher_cache: dict[bytes, torch.Tensor] = {}
        self._eval_teacher_key: tuple | None = None
        self._eval_teacher_batches: list[torch.Tensor] = []
        self._own_teacher_accuracy: dict[tuple, list] = {}  # each teacher's accuracy, its own preprocessing
        # Facts for the model card that the arguments do not hold (dataset, license, ...).
        self.card_info: dict[str, Any] = {}
        self._timing_cache: dict | None = None
        # loss terms summed since the last log (running sums: nothing piles up when logging is off)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, int] = defaultdict(int)
        self.last_loss_terms: dict[str, torch.Tensor] = {}  # the terms of the last training step
        self._schedule_values: dict[str, float] = {}
        self._eval_output_names: list[str] = []
        self._steps_per_epoch = 0
        self._search_defaults: dict[str, Any] = {}  # argument values before a hyperparameter search changed them
        self.search_trials: list[dict] = []  # each trial's parameters and metrics (hyperparameter_search)

        self._built = self._assemble(student, args)  # handed to the Trainer (directly, or as its model_init's first)
        super().__init__(
            model=None if model_init is not None else self._built,
            model_init=self._trial_model if model_init is not None else None,
            args=args,
            data_collator=data_collator or collate_images,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or self._default_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self._epoch_callback = None
        self._follow_epochs(train_dataset)
        # A timm model's forward(x) names no labels: tell the Trainer where they are.
        self.label_names = ["labels"]
        # compute_loss returns a per-batch mean, so the Trainer scales it for accumulation.
        self.model_accepts_loss_kwargs = False
        if args.teacher_sharding == "fsdp" and len(self.teachers) and self.accelerator.num_processes > 1:
            # cast where the teachers are (host memory), then shard: fully_shard moves one block at a time to
            # the device and keeps its shard there, so a whole teacher is never on one device
            self.teachers.to(dtype=self._teacher_dtype())
            self._shard_teachers()
        elif args.teacher_sharding == "fsdp" and len(self.teachers):
            logger.warning("teacher_sharding='fsdp' with a single process: the teacher stays whole")
        self.teachers.to(device=args.teacher_device or self.args.device, dtype=self._teacher_dtype())
        if args.channels_last:
            self.teachers.to(memory_format=torch.channels_last)
        if args.teacher_compile_options is not None and len(self.teachers):
            self.teachers.compile(**args.teacher_compile_options)  # compiled at the first step, placed and cast
        for line in inert_settings(self, train_dataset, eval_dataset, knn_train_dataset):
            logger.warning(line)

    def _assemble(self, student: nn.Module, args) -> "DistillationModel":
        """The trained container for a student: the method set up on it, the teachers' input adapters and
        taps for it, the method's extra modules built from a dry forward."""
        self.student_spec = input_spec(student)
        self.method.setup(student, list(self.teachers.models))
        self.teachers = self.teachers.rebuilt(self.student_spec, self.method.teacher_layers())
        for line in self.teachers.describe_inputs():
            logger.info(line)
        probe = self._probe(student)
        set_seed(args.seed)  # the extra modules start the same for the same seed, whatever ran before
        extras = self.method.build_modules(student, list(self.teachers.models), probe)
        wrapped = DistillationModel(student, extras, self.method, self.method.student_layers())
        if probe.get("student") and wrapped._taps is not None:  # known layouts: no recompile after a first compiled step
            wrapped._taps.set_layouts({name: layout for name, (_, layout) in probe["student"].items()})
        if probe.get("teacher"):
            self.teachers.set_layouts({name: layout for name, (_, layout) in probe["teacher"].items()})
        if args.channels_last:
            wrapped.to(memory_format=torch.channels_last)
        if args.sync_batchnorm and args.world_size > 1:
            if args.device.type != "cuda":
                raise ValueError("sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on CPU")
            wrapped = nn.SyncBatchNorm.convert_sync_batchnorm(wrapped)
        return wrapped

    # ------------------------------------------------------------------ model_init and hyperparameter search
    def _new_student(self, trial) -> nn.Module:
        from transformers.trainer_utils import number_of_arguments

        student = self._student_init(trial) if number_of_arguments(self._student_init) == 1 else self._student_init()
        if isinstance(student, str):
            student = load_model(student)
        if not isinstance(student, nn.Module):
            raise TypeError(f"model_init must return the student (an nn.Module or a name), got {type(student).__name__}")
        return student

    def _trial_model(self, trial=None) -> "DistillationModel":
        """The Trainer's model_init: a fresh student (the user's model_init) in a fresh container, the method
        rebuilt from the trial's arguments. The teachers and the teacher-output cache are kept: loaded once."""
        if self._built is not None:  # the one __init__ built, for the Trainer's own first call
            built, self._built = self._built, None
            return built
        args = self.args
        if trial is not None and self.hp_search_backend is not None:
            self._apply_trial(trial)  # the Trainer sets them only after this call; the container depends on them
            set_seed(args.seed)
        student = self._new_student(trial)
        self.method = get_method(args.distill_method)(args)
        if self.teacher_cache is not None:
            self.method.check_teacher_cache(self.teacher_cache)
            self._check_cache_mixing(args, self.teacher_cache)
        if self.method.student_output == "logits":
            check_label_spaces(student, list(self.teachers.models))
        # the same set-up as __init__'s: a trial that turns mixing on reads the data in the epoch order
        self.train_dataset = self._training_data(args, student, list(self.teachers.models))
        self._follow_epochs(self.train_dataset)
        self._term_sums, self._term_counts, self.last_loss_terms = {}, defaultdict(int), {}
        self._schedule_values = {}
        return self._assemble(student, args)

    def _apply_trial(self, trial) -> None:
        from transformers.trainer_utils import HPSearchBackend

        if self.hp_search_backend == HPSearchBackend.OPTUNA:
            params = dict(self.hp_space(trial))
        else:
            params = {k: v for k, v in dict(trial).items() if k != "wandb"}
        for key, value in params.items():
            if not hasattr(self.args, key):
                raise ValueError(f"the search space sets '{key}', which is not an argument of "
                                 "DistillationTrainingArguments")
            old = getattr(self.args, key)
            self._search_defaults.setdefault(key, old)
            if old is not None and not isinstance(old, bool) and isinstance(old, (int, float, str)):
                value = type(old)(value)  # as the Trainer casts them
            setattr(self.args, key, value)
        if "alpha" in params and not get_method(self.args.distill_method).uses_alpha:
            raise ValueError(f"the search space sets alpha, which distill_method='{self.args.distill_method}' does "
                             "not use")
        self.args.check_distillation()
        self._trial_params = params
        logger.info("trial %s: %s", getattr(trial, "number", ""), params)

    def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials: int = 20, direction=None,
                              backend=None, hp_name=None, metric: str | None = None, **kwargs):
        """``Trainer.hyperparameter_search`` (Optuna or Ray Tune) over distillation and Trainer arguments.

        ``hp_space``: a search space dict (:mod:`hf_distill.search` format), or the Trainer's function of a
        trial; default: the learning rate and the method's own weights (``temperature``, ``alpha``, ...).
        The objective defaults to the student's ``eval_accuracy`` (label-free: ``eval_knn_accuracy``, else
        ``eval_feature_cosine``), maximised; ``metric`` names another evaluation metric (``loss`` minimised).
        The student (``model_init``) and the method's extra modules are rebuilt each trial; the teachers
        and the teacher-output cache are loaded once and shared. ``search_trials`` lists each trial's
        parameters and metrics (Optuna; Ray Tune reports them in ``best_run.run_summary``), and the
        arguments are restored afterwards.
        """
        from .search import SearchSpace, available_backend, check_backend, default_search_space, metric_objective

        if self._student_init is None:
            raise ValueError("hyperparameter_search rebuilds the student for every trial: pass it as model_init= "
                             "(a function returning a fresh student) instead of model=")
        if self.eval_dataset is None:
            raise ValueError("hyperparameter_search compares trials on the evaluation set: pass eval_dataset=")
        backend = str(getattr(backend, "value", backend) or available_backend())
        check_backend(backend)
        if not callable(hp_space):
            space = SearchSpace.from_dict(hp_space or default_search_space(self.method, self.args), type(self.args))
            logger.info("search space: %s", space.describe())
            hp_space = space.for_backend(backend)
        objective, default_direction = metric_objective(metric)
        if compute_objective is None:
            compute_objective, direction = objective, direction or default_direction
        direction = direction or "minimize"  # the Trainer's default for a compute_objective of one's own
        records = self.search_trials = []
        self._trial_params = {}

        def recorded(metrics):  # every evaluation of a trial reports here; its last one is kept
            value = compute_objective(metrics)
            entry = {"trial": len(records) if self._trial_params is not None else len(records) - 1,
                     "params": dict(self._trial_params or records[-1]["params"]), "step": self.state.global_step,
                     "metrics": dict(metrics), "objective": value}
            if self._trial_params is None:
                records[-1] = entry
            else:
                records.append(entry)
                self._trial_params = None  # later evaluations of this trial replace its entry
            return value

        if backend == "ray":
            kwargs.setdefault("storage_path", os.path.abspath(os.path.join(self.args.output_dir, "ray_results")))
            # Ray pickles the trainer for its workers; accelerate's shared gradient state still holds weak
            # references to loaders of earlier runs in this process (one stopped at max_steps mid-epoch is never
            # unregistered), which cannot be pickled. No loader is running now: forget them.
            self.accelerator.gradient_state.dataloader_references = [None]
        self._search_defaults = {}
        try:
            best = super().hyperparameter_search(hp_space, recorded, n_trials, direction, backend, hp_name, **kwargs)
        finally:
            for key, value in self._search_defaults.items():  # the arguments as they were before the search
                setattr(self.args, key, value)
            if self.model is None:  # Ray Tune leaves the Trainer without a model
                self.model = self.model_wrapped = self._trial_model()
        return best

    def _shard_teachers(self) -> None:
        """FSDP2 over all processes for every teacher (after the cast to teacher_dtype: the shards are half precision)."""
        world = self.accelerator.num_processes
        from torch.distributed.device_mesh import init_device_mesh

        from .sharding import local_parameter_count, shard_teacher

        mesh = init_device_mesh(self.args.device.type, (world,))
        for teacher in self.teachers.models:
            shard_teacher(teacher, mesh)
        self.teachers.sharded = True
        logger.info("teachers sharded over %d processes: %d of %d parameters held here", world,
                    sum(local_parameter_count(t) for t in self.teachers.models),
                    sum(count_parameters(t) for t in self.teachers.models))

    def _check_teacher_cache(self, args, teachers, train_dataset):
        """The teacher-output cache named by ``teacher_cache_dir``, checked now rather than at the first step."""
        from .teacher_cache import TeacherCacheDataset, load_teacher_cache

        if not args.teacher_cache_dir:  # (a train_dataset that reads a cache has named it in __init__)
            return None

        if self.method.teacher_layers():
            raise ValueError(f"distill_method='{args.distill_method}' needs the teacher's intermediate features, which "
                             "a teacher-output cache does not hold (it stores logits, or the backbone features of "
                             "distill_method='feature'): drop teacher_cache_dir, or use a logit method (kd, dkd, dist, "
                             "noisy_teacher, function_matching)")
        if not self.method.uses_teacher:
            raise ValueError(f"distill_method='{args.distill_method}' uses no teacher outputs: drop teacher_cache_dir")
        if args.teacher_ensemble == "random":
            raise ValueError("teacher_ensemble='random' cannot be served from a teacher-output cache, which stores the "
                             "mean of the teachers' logits: use teacher_ensemble='mean' or train with live teachers")
        if args.dataloader_persistent_workers:
            raise ValueError("dataloader_persistent_workers would freeze the cached epoch in the workers (cached views "
                             "change every epoch): leave it off with teacher_cache_dir")
        cache = load_teacher_cache(args.teacher_cache_dir)  # refuses a missing or partial cache
        wanted = "features" if self.method.teacher_output == "features" else "logits"
        if cache.outputs != wanted:
            raise ValueError(f"the teacher cache in {args.teacher_cache_dir} holds the teachers' {cache.outputs}, but "
                             f"distill_method='{args.distill_method}' learns their {wanted}: build a cache of "
                             f"{wanted} (hf-distill cache-teacher --distill_method {args.distill_method})")
        self.method.check_teacher_cache(cache)  # what this objective needs from the stored outputs
        if train_dataset is not None:
            if not isinstance(train_dataset, TeacherCacheDataset):
                raise ValueError(
                    f"teacher_cache_dir='{args.teacher_cache_dir}' is set but train_dataset does not read from it: pass "
                    "train_dataset=with_teacher_cache(raw_dataset, teacher_cache_dir, input_spec(student))")
            if os.path.realpath(train_dataset.cache.cache_dir) != os.path.realpath(args.teacher_cache_dir):
                raise ValueError(f"train_dataset reads the teacher cache in '{train_dataset.cache.cache_dir}' but "
                                 f"teacher_cache_dir is '{args.teacher_cache_dir}'")
        self._check_cache_mixing(args, cache)
        if teachers:
            # the teachers named here are the ones cards and eval_teacher_accuracy report: they must be the cache's
            cache.check(teachers=teachers)
        return cache

    @staticmethod
    def _check_cache_mixing(args, cache) -> None:
        """A mixed cache stores whole mixed batches: the run must mix the same way, in batches of the same size."""
        data_seed = args.data_seed if args.data_seed is not None else args.seed
        cache.check(mixing=args.mixing, batch_size=args.per_device_train_batch_size,
                    seed=data_seed if cache.mixed else None)
        per_round = args.per_device_train_batch_size * args.world_size
        if cache.mixed and args.world_size > 1 and cache.num_samples % per_round and not args.dataloader_drop_last:
            raise ValueError(f"a mixed cache of {cache.num_samples} images on {args.world_size} processes: accelerate "
                             f"would pad the epoch's last round of {per_round} with images whose stored mixing "
                             "partners are elsewhere; set dataloader_drop_last=True (or a dataset size that is a "
                             "multiple of the batch size times the processes)")

    def _training_data(self, args, student, teachers):
        """One set-up path for the training data, shared by ``__init__`` and every search trial: the batch
        mixer (``self.mixer``) and the dataset as the run reads it (in the epoch order when mixing)."""
        self.mixer, data = self._mixing(args, student, teachers, self._raw_train_dataset)
        self._stream_epoch_steps = self._stream_steps_per_epoch(args, data)
        counted = [a for a in self.method.epoch_arguments if getattr(args, a, None)]
        if self._stream_epoch_steps == 0 and counted:
            raise ValueError(f"{counted[0]} counts epochs, but the training stream has no known length to count them "
                             f"in: set {counted[0]}=0, or give the stream its length (info.splits, as "
                             "load_dataset(..., streaming=True) does), or train on map-style data")
        return data

    @staticmethod
    def _stream_steps_per_epoch(args, dataset) -> int | None:
        """Optimizer steps in one pass over a stream (from its split's number of examples; 0 when unknown); None
        for map-style data, whose epochs the Trainer counts itself (for a stream it takes max_steps for one)."""
        import math

        from .data import is_stream

        if not is_stream(dataset):
            return None
        splits, split = getattr(dataset.info, "splits", None), getattr(dataset, "split", None)
        rows = splits[str(split)].num_examples if splits and split is not None and str(split) in splits else 0
        if not rows:
            return 0
        batches = math.ceil(rows / (args.per_device_train_batch_size * max(1, args.world_size)))
        return max(1, math.ceil(batches / args.gradient_accumulation_steps))

    def _follow_epochs(self, dataset) -> None:
        """Tell a dataset whose items depend on the epoch (cached views, the epoch's order) each epoch: with
        several processes only a callback reaches it. Replaces the callback of an earlier set-up."""
        if self._epoch_callback is not None:
            self.remove_callback(self._epoch_callback)
            self._epoch_callback = None
        from .mixing import EpochOrderedDataset
        from .teacher_cache import TeacherCacheDataset

        if isinstance(dataset, (TeacherCacheDataset, EpochOrderedDataset)):
            self._epoch_callback = SetEpochCallback(dataset)
            self.add_callback(self._epoch_callback)

    @staticmethod
    def _stream_reading(args, train_dataset) -> None:
        """With several processes, a stream of at least as many shards as processes is split by shard, each
        process reading only its own (accelerate's default for streams: the first process reads, decodes and
        sends every batch); fewer shards keep that default."""
        from .data import is_stream

        if not is_stream(train_dataset) or args.world_size < 2:
            return
        config = args.accelerator_config
        if getattr(config, "dispatch_batches", None) is None and train_dataset.n_shards >= args.world_size:
            config.dispatch_batches = False
            logger.info("stream of %d shards on %d processes: each process reads its own shards",
                        train_dataset.n_shards, args.world_size)

    def _mixing(self, args, student, teachers, train_dataset):
        """(the batch mixer, the training data in its epoch order) when mixup / CutMix is on."""
        if not args.mixing.enabled:
            return None, train_dataset
        from .mixing import BatchMixer, EpochOrderedDataset
        from .models import num_classes_of

        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            raise ValueError("dataloader_persistent_workers would freeze the epoch order of mixed batches in the "
                             "workers (set_epoch never reaches them): leave it off with mixup / CutMix")
        n_classes = num_classes_of(student) or next((num_classes_of(t) for t in teachers if num_classes_of(t)), None)
        if n_classes is None:
            raise ValueError("mixup / CutMix needs the number of classes for the mixed labels: give the student a "
                             "num_classes (timm) / num_labels (transformers) attribute")
        seed = args.data_seed if args.data_seed is not None else args.seed
        mixer = BatchMixer(args.mixing, n_classes, seed)
        if train_dataset is not None and not getattr(train_dataset, "ordered_by_epoch", False):
            if not hasattr(train_dataset, "__len__"):
                raise ValueError("mixup / CutMix with a dataset without a length (a stream) is not supported: the "
                                 "mixed batches follow a per-epoch order of the whole dataset")
            # a sample is mixed with its batch partner: batches follow a fixed per-epoch order so that where
            # a batch sits decides its mixing (and a teacher-output cache can replay it)
            train_dataset = EpochOrderedDataset(train_dataset, seed)
        return mixer, train_dataset

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "ordered_by_epoch", False):
            return torch.utils.data.SequentialSampler(dataset)  # the dataset orders itself per epoch
        return super()._get_train_sampler(train_dataset)

    def _mix(self, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch mixed once (student and teachers see the same images), and its mixed soft labels."""
        from .mixing import MixParams

        x, labels = inputs["pixel_values"], inputs.get("labels")
        positions, epochs = inputs.get("mix_position"), inputs.get("mix_epoch")
        if positions is None:
            raise RuntimeError("mixed training needs batches in the epoch order (EpochOrderedDataset); a custom "
                               "sampler or collator dropped it")
        size, start = self.args.per_device_train_batch_size, int(positions[0])
        expected = torch.arange(start, start + len(positions), device=positions.device)
        if (start % size or not torch.equal(positions, expected)) and self.accelerator.num_processes > 1 and (
                "mix_lam" not in inputs):
            # accelerate's even_batches completed the epoch's last round with samples from the epoch's start: a
            # batch of its own, mixed within itself by draws of its own (past the epoch's batch indices)
            batches = -(-len(self.train_dataset) // size)
            params = self.mixer.params(int(epochs[0]), batches + start, x.shape)
            return self.mixer.apply(x, params), (self.mixer.targets(labels, params) if labels is not None else None)
        if start % size or not torch.equal(positions, expected):
            raise RuntimeError(f"a mixed batch must be a run of consecutive positions starting at a multiple of the "
                               f"batch size ({size}); got positions {positions.tolist()[:4]}...")
        if "mix_lam" in inputs:  # a teacher-output cache: the parameters its teacher saw, replayed
            boxes = [tuple(int(v) for v in b) if b[0] >= 0 else None for b in inputs["mix_box"].tolist()]
            params = MixParams(lam=[float(v) for v in inputs["mix_lam"].tolist()],
                               partner=[int(p) - start for p in inputs["mix_partner"].tolist()], boxes=boxes)
        else:
            params = self.mixer.params(int(epochs[0]), start // size, x.shape)
        return self.mixer.apply(x, params), (self.mixer.targets(labels, params) if labels is not None else None)

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _resolve_teachers(teacher_model, args) -> list[nn.Module]:
        if teacher_model is not None:
            return list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        return [load_model(name, revision=args.teacher_revision) for name in args.teacher_names]

    def _probe(self, student: nn.Module) -> dict:
        """Shapes and layouts of the tapped layers (or the backbone features' widths), from one dry forward of
        each model."""
        s_layers, t_layers = self.method.student_layers(), self.method.teacher_layers()
        spec = self.student_spec
        example = torch.zeros(2, spec.in_chans, *spec.image_size)
        if self.method.student_output == "features":
            teacher_widths = [feature_shapes(t, self.teachers.prepare_input(i, example))[:2]
                              for i, t in enumerate(self.teachers.models)]
            if not teacher_widths and self.teacher_cache is not None:  # trained from a feature cache alone
                teacher_widths = [(s.get("summary", [0])[0], s.get("spatial", [0])[0])
                                  for s in self.teacher_cache.feature_shapes]
            return {"student_features": feature_shapes(student, example)[:2], "teacher_features": teacher_widths}
        if not (s_layers or t_layers):
            return {}
        probe = {"student": probe_features(student, s_layers, example), "teacher": {}}
        if t_layers and len(self.teachers):
            teacher, adapter = self.teachers.models[0], self.teachers.adapters[0]
            probe["teacher"] = probe_features(teacher, t_layers, adapter(example))
            self.teachers.pop_features()  # the probe's features must not reach the first step
        return probe

    def _teacher_dtype(self) -> torch.dtype:
        choice = self.args.teacher_dtype
        if choice == "auto":
            on_accelerator = self.args.device.type not in ("cpu", "mps")
            if self.args.bf16 and on_accelerator:
                return torch.bfloat16
            if self.args.fp16 and on_accelerator:
                return torch.float16
            return torch.float32
        return getattr(torch, choice)

    @property
    def student(self) -> nn.Module:
        """The student being trained (unwrapped)."""
        return self._container.student

    @property
    def _container(self) -> DistillationModel:
        # self.model is the unwrapped container unless torch.compile wrapped it
        model = self.model
        return model if isinstance(model, DistillationModel) else self.accelerator.unwrap_model(model)

    @property
    def extra_modules(self) -> nn.ModuleDict:
        return self._container.extras

    @property
    def progress(self) -> Progress:
        state = self.state
        steps = getattr(self, "_stream_epoch_steps", None)
        if steps is not None:  # a stream: epochs of its own length, not the Trainer's (max_steps long)
            return Progress(step=state.global_step, max_steps=state.max_steps,
                            epoch=state.global_step / steps if steps else 0.0,
                            num_epochs=state.max_steps / steps if steps else 0.0, steps_per_epoch=steps)
        return Progress(step=state.global_step, max_steps=state.max_steps, epoch=state.epoch or 0.0,
                        num_epochs=float(getattr(state, "num_train_epochs", 0) or self.args.num_train_epochs),
                        steps_per_epoch=self._steps_per_epoch)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._steps_per_epoch = values[1]  # update steps per epoch: schedules run on steps (max_steps, fractions)
        return values

    # ------------------------------------------------------------------ training
    def teacher_logits(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The teachers' clean logits on a student batch (mean over teachers), without autograd."""
        return self.teacher_outputs(pixel_values, training=False)[0]

    def teacher_outputs(self, pixel_values: torch.Tensor, training: bool = True
                        ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(target logits, tapped features) of the teachers on a student batch, without autograd.

        In training, ``teacher_ensemble="random"`` runs one teacher drawn per batch, and each
        teacher's logits are perturbed (noisy teacher) before averaging. Randomness comes from the
        global torch RNG, seeded by ``args.seed`` and restored on resume with the checkpoint.
        """
        n = len(self.teachers)
        if not n:
            return None, {}
        if training and not self.method.teacher_logits_needed(self.progress):
            with self.accelerator.autocast():
                return None, self.teachers.features_only(pixel_values)  # e.g. FitNets stage 1
        which = None
        if training and n > 1 and self.args.teacher_ensemble == "random":
            which = [int(torch.randint(n, (1,)).item())]
        with self.accelerator.autocast():
            outs = self.teachers(pixel_values, which)
        features = self.teachers.pop_features()
        if training:
            return self._perturb(outs), features
        return (outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)), features

    def teacher_feature_maps(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every teacher's backbone features on a student batch, without autograd: ``{"<key>/summary",
        "<key>/spatial"}`` (keys as the method names the teachers)."""
        with self.accelerator.autocast():
            outs = self.teachers.backbone_features(pixel_values)
        # contiguous, as a feature cache gives them back: the loss then rounds the same way either way
        return {f"{key}/{name}": value.contiguous() for key, (summary, spatial) in zip(self.method.keys, outs)
                for name, value in (("summary", summary), ("spatial", spatial))}

    def _cached_feature_maps(self, inputs) -> dict[str, torch.Tensor] | None:
        """The teachers' features read from a feature cache (``teacher_features/<i>/<target>``), named as
        :meth:`teacher_feature_maps` names them; None when the batch carries none."""
        if "teacher_features/0/" + self.method.targets[0] not in inputs:
            return None
        return {f"{key}/{target}": inputs[f"teacher_features/{i}/{target}"]
                for i, key in enumerate(self.method.keys) for target in self.method.targets}

    def _perturb(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Noisy-teacher perturbation of each teacher's logits (training only), then their mean."""
        outs = [perturb_logits(z, self.args.teacher_noise_std, self.args.teacher_noise_prob) for z in outs]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = inputs["pixel_values"], inputs.get("labels")
        if labels is None and model.training and self.method.labels_needed():
            raise ValueError(f"the training batches carry no labels, but distill_method='{self.args.distill_method}'"
                             + (f" with alpha={self.args.alpha}" if self.args.distill_method in ("kd", "noisy_teacher")
                                else "") + " trains on them: give the dataset a label column"
                             + (", or set alpha=1 (the teacher term alone)"
                                if self.args.distill_method in ("kd", "noisy_teacher") else ""))
        if model.training and self.mixer is not None:
            pixel_values, labels = self._mix(inputs)
        pixel_values = self._memory_format(pixel_values)  # once, for the student and every teacher
        progress = self.progress
        if model.training:
            self.method.prepare_student(self.student, progress)
        if model.training and not self.method.student_logits_needed(progress):
            out = model(pixel_values=pixel_values, features_only=True)  # e.g. FitNets stage 1
        else:
            out = model(pixel_values=pixel_values)
        # cached outputs are read only from the cache named by teacher_cache_dir (checked at construction)
        from_cache = model.training and self.teacher_cache is not None
        cached = inputs.get("teacher_logits") if from_cache else None
        if self.method.teacher_output == "features":
            cached_features = self._cached_feature_maps(inputs) if from_cache else None
            teacher_logits = None
            teacher_features = cached_features if cached_features is not None else self.teacher_feature_maps(
                pixel_values)
        elif cached is not None and model.training and self.method.uses_teacher and not self.method.teacher_layers():
            # soft labels read from a teacher-output cache: the teacher does not run at all
            teacher_logits, teacher_features = self._perturb([cached.float()]), {}
        else:
            teacher_logits, teacher_features = (
                self.teacher_outputs(pixel_values, training=model.training) if self.method.uses_teacher
                else (None, {})
            )
        n_student = out["logits"].shape[-1] if out["logits"] is not None else None
        if teacher_logits is not None and n_student is not None and teacher_logits.shape[-1] != n_student:
            raise ValueError(
                f"class-count mismatch: the student outputs {n_student} logits but the teacher "
                f"outputs {teacher_logits.shape[-1]}"
            )
        step = StepOutputs(
            student_logits=out["logits"],
            student_dist_logits=out["heads"].get("dist_head"),
            labels=labels,
            teacher_logits=teacher_logits,
            student_features=out["features"],
            teacher_features=teacher_features,
            extra_outputs=out["extra"],
            progress=progress,
        )
        loss, terms = self.method.loss(step)
        if model.training:
            self.last_loss_terms = {key: value.detach().float() for key, value in terms.items()}
            for key, value in self.last_loss_terms.items():
                self._term_sums[key] = self._term_sums[key] + value if key in self._term_sums else value
                self._term_counts[key] += 1
            # schedule values as they were for this step (the state has moved on by log time)
            self._schedule_values = self.method.log_values(progress)
        return (loss, out) if return_outputs else loss

    def _memory_format(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.args.channels_last and pixel_values.ndim == 4:
            return pixel_values.contiguous(memory_format=torch.channels_last)
        return pixel_values

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        trainable = self.method.trainable_parameters(self.student, self.progress)
        if trainable is not None:
            # Parameters outside the current stage must not move at all (not even by weight
            # decay): optimizers skip parameters whose grad is None.
            for name, param in self.student.named_parameters():
                if name not in trainable:
                    param.grad = None
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._term_sums and not any(k.startswith("eval_") for k in logs):
            for key, total in self._term_sums.items():
                mean = total / self._term_counts[key]
                logs[key] = round(self.accelerator.reduce(mean, reduction="mean").item(), 6)
            self._term_sums.clear()
            self._term_counts.clear()
            logs.update(self._schedule_values)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Student logits and label cross-entropy (``eval_loss`` is the student's CE for every method).

        The teachers' logits on the same batch are kept for the teacher metrics (once per evaluation
        dataset: they are cached, the teachers do not change)."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        inputs["pixel_values"] = self._memory_format(inputs["pixel_values"])
        with torch.no_grad(), self.autocast_smart_context_manager():
            out = model(pixel_values=inputs["pixel_values"])
        if self.method.student_output == "features":
            return self._feature_prediction_step(out, inputs["pixel_values"], labels, prediction_loss_only)
        logits = out["logits"].float()
        loss = F.cross_entropy(logits, labels).detach() if labels is not None else None
        if prediction_loss_only:
            return loss, None, None
        if self._eval_teacher_key is not None:
            self._collect_teacher_logits(inputs["pixel_values"])
        extra = {**self.method.eval_logits(out), **{k: v.float() for k, v in out["heads"].items()}}
        if extra:  # predictions become (student, *extra) and metrics are named after them
            self._eval_output_names = list(extra)
            return loss, (logits.detach(), *(v.detach() for v in extra.values())), labels
        return loss, logits.detach(), labels

    def _feature_prediction_step(self, out, pixel_values, labels, prediction_loss_only):
        """Methods without class logits: the predictions are per-sample values (cosine to each teacher, ...)."""
        if prediction_loss_only or not len(self.teachers):
            return None, None, None
        with torch.no_grad():
            step = StepOutputs(student_logits=None, labels=labels, student_features=out["features"],
                               teacher_features=self.teacher_feature_maps(pixel_values), extra_outputs=out["extra"],
                               progress=self.progress)
            values = self.method.eval_values(step)
        self._eval_output_names = list(values)
        return None, torch.stack([v.float() for v in values.values()], dim=1), labels

    def _default_metrics(self, eval_pred) -> dict[str, float]:
        if self.method.student_output == "features":
            return feature_metrics(eval_pred, self._eval_output_names)
        return accuracy_metrics(eval_pred, self._eval_output_names)

    def _collect_teacher_logits(self, pixel_values: torch.Tensor) -> None:
        """The teachers' logits of an evaluation batch, each example's computed once: keyed by its pixels (the
        frozen teachers give an image the same logits whatever batch, batch size or dataset it comes in)."""
        import hashlib

        rows = pixel_values.detach().cpu().contiguous()
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in rows]
        known = [self._eval_teacher_cache.get(k) for k in keys]
        if any(v is None for v in known) or self.teachers.sharded:  # a sharded forward needs every process
            logits = self.teacher_logits(pixel_values).float().cpu()
            self._eval_teacher_cache.update(zip(keys, logits))
        else:
            logits = torch.stack(known)
        self._eval_teacher_batches.append(self.accelerator.gather_for_metrics(logits.to(pixel_values.device)).cpu())

    def _sync_buffers(self) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics): each process updated its own
        with its own batches since DDP's last broadcast, and rank 0's are the ones saved."""
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            for buffer in self.accelerator.unwrap_model(self.model).buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        from .data import is_stream

        if is_stream(dataloader.dataset) and self.accelerator.num_processes > 1:
            raise ValueError("evaluating a stream over several processes would give each process a different "
                             "number of batches: evaluate a map-style dataset (load its split without streaming)")
        self._sync_buffers()
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        if len(self.teachers) and self.args.eval_teacher and not loss_only and self.method.teacher_output == "logits":
            self._eval_teacher_key = (id(dataloader.dataset), _length(dataloader.dataset))
        self._eval_teacher_batches = []
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            collected, self._eval_teacher_key = self._eval_teacher_key, None
        if collected is not None and self._eval_teacher_batches and output.predictions is not None:
            teacher = torch.cat(self._eval_teacher_batches).numpy()
            preds = output.predictions
            student = preds[0] if isinstance(preds, tuple) else preds
            measured = teacher_metrics(_concat(student), teacher, output.label_ids)
            measured = with_own_teacher_accuracy(measured, list(self.teachers.models), dataloader.dataset,
                                                 self._own_teacher_accuracy, self.student_spec)
            for name, value in measured.items():
                output.metrics[f"{metric_key_prefix}_{name}"] = value
        self._eval_teacher_batches = []
        if (self.method.student_output == "features" and output.predictions is not None
                and f"{metric_key_prefix}_feature_cosine" not in output.metrics):
            # the Trainer calls compute_metrics only with labels; feature metrics need none
            from transformers import EvalPrediction

            values = feature_metrics(EvalPrediction(output.predictions, None), self._eval_output_names)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in values.items()})
        if self.method.student_output == "features" and self.knn_train_dataset is not None:
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._knn_metrics(dataloader).items()})
        return output

    @torch.no_grad()
    def _summary_features(self, dataloader, teachers: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Summary features of the student (or of each teacher) over a dataloader, gathered, with the labels."""
        student_feats, teacher_feats, labels = [], [], []
        model = self._container
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            if "labels" not in batch:
                raise ValueError("k-NN accuracy needs labels in both the k-NN training set and the evaluation set")
            x = batch["pixel_values"]
            if teachers:
                outs = self.teachers.backbone_features(x)
                teacher_feats.append([self.accelerator.gather_for_metrics(s.float()).cpu() for s, _ in outs])
            else:
                with self.autocast_smart_context_manager():
                    summary, _ = backbone_features(model.student, x.to(next(model.student.parameters()).dtype))
                student_feats.append([self.accelerator.gather_for_metrics(summary.float()).cpu()])
            labels.append(self.accelerator.gather_for_metrics(batch["labels"]).cpu())
        rows = teacher_feats if teachers else student_feats
        return [torch.cat(column) for column in zip(*rows)], torch.cat(labels)

    def _knn_metrics(self, eval_dataloader) -> dict[str, float]:
        """DINO's k-NN top-1 of the student's summary features and, once per dataset, of each teacher's."""
        memory = self.get_eval_dataloader(self.knn_train_dataset)
        was_training = self._container.training
        self._container.eval()
        try:
            (train_s,), train_y = self._summary_features(memory)
            (test_s,), test_y = self._summary_features(eval_dataloader)
            metrics = {"knn_accuracy": knn_accuracy(train_s, train_y, test_s, test_y)}
            key = (id(self.knn_train_dataset), id(eval_dataloader.dataset), _length(eval_dataloader.dataset))
            if self.args.eval_teacher and len(self.teachers) and key not in self._teacher_knn:
                train_t, _ = self._summary_features(memory, teachers=True)
                test_t, _ = self._summary_features(eval_dataloader, teachers=True)
                names = ["teacher_knn_accuracy"] if len(train_t) == 1 else [
                    f"teacher_knn_accuracy_{k}" for k in self.method.keys]
                self._teacher_knn[key] = {n: knn_accuracy(a, train_y, b, test_y)
                                          for n, a, b in zip(names, train_t, test_t)}
            metrics.update(self._teacher_knn.get(key, {}))
        finally:
            self._container.train(was_training)
        return metrics

    # ------------------------------------------------------------------ saving & resuming
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the student alone, in its own library's format (plus card and arguments).

        A checkpoint (``_save_checkpoint``) holds what resumes training: the whole student. An export
        (``save_model``) holds what the user ships: for feature distillation, the backbone alone."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student_state = None
        if state_dict is not None:
            student_state = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        if self.method.student_output == "features" and not getattr(self, "_checkpointing", False):
            # the export: the backbone, without a classifier it never trained
            save_native(export_backbone(self.student), output_dir)
        else:
            save_native(self.student, output_dir, state_dict=student_state)
        self.method.save(self.student, self.extra_modules, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # pickles without tokens
        self.create_model_card(output_dir=output_dir)

    def _save_checkpoint(self, model, trial):
        self._checkpointing = True  # _save writes the whole student, which _load_from_checkpoint restores
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpointing = False
        # Extra modules live only in checkpoints (to resume), never in the exported student.
        if self.args.should_save and len(self.extra_modules):
            import safetensors.torch

            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {k: v.detach().contiguous() for k, v in self.extra_modules.state_dict().items()}
            safetensors.torch.save_file(state, os.path.join(folder, EXTRA_MODULES_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        container = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_native_weights(container.student, resume_from_checkpoint)
        extras_path = os.path.join(resume_from_checkpoint, EXTRA_MODULES_NAME)
        if len(container.extras):
            if not os.path.exists(extras_path):
                raise FileNotFoundError(
                    f"checkpoint {resume_from_checkpoint} has no {EXTRA_MODULES_NAME}: it was not written by a "
                    f"'{self.args.distill_method}' run, so its extra modules cannot be restored"
                )
            import safetensors.torch

            container.extras.load_state_dict(safetensors.torch.load_file(extras_path))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def push_to_hub(self, *args, **kwargs):
        """Upload the student (native format + card) to the Hub; see ``Trainer.push_to_hub``."""
        # Write the local output first: a failed upload must still leave a complete model folder.
        self.save_model(_internal_call=True)
        return super().push_to_hub(*args, **kwargs)

    # ------------------------------------------------------------------ model card
    def model_card_context(self, **overrides) -> CardContext:
        """Everything the generated model card reports, from this run."""
        student, args = self.student, self.args
        spec = self.student_spec
        metrics = self.model_card_metrics()
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        world = self.accelerator.num_processes
        training = {
            "epochs": round(float(self.state.epoch or 0.0), 3),  # as trained, not as asked (0 when untrained)
            "steps": self.state.global_step,
            "train_batch_size": args.per_device_train_batch_size * world * args.gradient_accumulation_steps,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "precision": precision,
            "num_processes": world,
            "seed": args.seed,
        }
        if args.label_smoothing_factor:
            training["label_smoothing"] = args.label_smoothing_factor
        if getattr(student, "hf_distill_init", None):
            training["initialisation"] = student.hf_distill_init
        teacher_names = [display_name(t) for t in self.teachers.models]
        if not teacher_names and self.teacher_cache is not None:  # trained from cached outputs: name their teacher
            teacher_names = [short_name(n) for n in self.teacher_cache.config.get("teacher_id") or []]
        ctx = CardContext(
            student_name=display_name(student),
            library_name=model_family(student),
            student_params=count_parameters(student),
            method=args.distill_method,
            teacher_names=teacher_names,
            teacher_params=[count_parameters(t) for t in self.teachers.models],
            method_paper=self.method.paper,
            metrics=metrics,
            dataset=self.card_info.get("dataset"),
            license=self.card_info.get("license"),
            training=training,
            timing=self._timing(),
            label_names=label_names_of(student),
            repo_id=args.hub_model_id if args.push_to_hub else self.card_info.get("repo_id"),
            image_size=tuple(spec.image_size),
            in_chans=spec.in_chans,
            notes={**self.method.card_notes(), **self.card_info.get("notes", {})},
            task="image-classification" if self.method.student_output == "logits" else "image-feature-extraction",
            **run_record(self),
        )
        for key, value in overrides.items():
            setattr(ctx, key, value)
        return ctx

    def model_card_metrics(self) -> dict[str, float]:
        """The last evaluation's metrics (without ``eval_``), as the card reports them."""
        metrics = {}
        for entry in self.state.log_history:
            for key, value in entry.items():
                if key.startswith("eval_") and isinstance(value, (int, float)) and not key.endswith(
                        ("_runtime", "_per_second", "_loss", "_preparation_time")):
                    metrics[key[len("eval_"):]] = float(value)
        return metrics

    def _timing(self) -> dict:
        """Inference time of student and teachers, measured once per run on this machine."""
        if self._timing_cache is None:
            spec = self.student_spec
            device = next(self.student.parameters()).device
            x = torch.zeros(8, spec.in_chans, *spec.image_size, device=device)
            # each model run as training runs it: a classifier's forward, or a backbone's features (a CLIPModel's
            # plain forward would want text too)
            call = backbone_features if self.method.student_output == "features" else forward_images
            timing = {"student_ms_per_image": measure_latency_ms(self.student, x, call=call), "batch_size": 8,
                      "device": str(device), "image_size": f"{spec.image_size[0]}x{spec.image_size[1]}"}
            if len(self.teachers) and not self.teachers.sharded:  # a sharded forward needs every process
                # each teacher as training runs it: through its input adapter, in its own dtype
                timing["teacher_ms_per_image"] = sum(
                    measure_latency_ms(t, self.teachers.prepare_input(i, x), call=call)
                    for i, t in enumerate(self.teachers.models))
            self._timing_cache = timing
        return self._timing_cache

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, output_dir=None, **_):
        """Write the distillation model card (``README.md``) into the output folder.

        Replaces the Trainer's text card; called on every ``save_model`` and by ``push_to_hub``.
        """
        if not self.is_world_process_zero():
            return
        overrides = {k: v for k, v in {"license": license, "dataset": dataset}.items() if v is not None}
        card = build_model_card(self.model_card_context(**overrides))
        folder = output_dir or self.args.output_dir
        os.makedirs(folder, exist_ok=True)
        card.save(os.path.join(folder, "README.md"))
