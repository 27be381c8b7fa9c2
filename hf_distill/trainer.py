"""``DistillationTrainer``: a ``transformers.Trainer`` that distills any image classifier into another.

The trainer puts the parts together and names no method: the method (``hf_distill.methods``) says what
it needs and computes the loss; the teacher source (``hf_distill.teachers``) says what the teachers
output, live or cached; ``hf_distill.training`` holds the trained container, the training data's
set-up, evaluation, checkpoints and the card's record.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import nn
from transformers import Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import DistillationTrainingArguments
from .callbacks import SetEpochCallback
from .data import collate_images, is_stream
from .inert import inert_settings
from .methods import Progress, Stage, StepOutputs, get_method
from .mixing import mix_batch
from .cards import CardContext, build_model_card
from .models import input_spec, load_model
from .search import TrialRecords, apply_params, trial_params
from .teachers import TeacherSource, Teachers, open_teacher_cache, place_teachers
from .teachers.source import check_teacher_cache
from .training.card_context import card_context, card_metrics, timing
from .training.checkpoints import restore, write_extras, write_student
from .training.container import DistillationModel, probe_shapes
from .training.data_setup import align_label_spaces, split_stream_by_shard, training_data
from .training.step_logging import logs_this_step
from .training.evaluation import Evaluation, prediction_metrics

logger = logging.getLogger(__name__)


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
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func is not supported: the distillation method computes the loss "
                             "(DistillationTrainer.compute_loss); choose or add a method instead")
        if args.batch_eval_metrics and compute_metrics is None:
            raise ValueError("batch_eval_metrics needs a compute_metrics that accepts compute_result; the default "
                             "accuracy metric scores the whole evaluation set at once")
        self._student_init = model_init
        if model_init is not None:
            set_seed(args.seed)  # as the Trainer does before a model_init: the same student for the same seed
            student = self._new_student(None)
        else:
            student = load_model(model) if isinstance(model, str) else model
        from .teacher_cache import TeacherCacheDataset

        if not args.teacher_cache_dir and isinstance(train_dataset, TeacherCacheDataset):
            # train_dataset=with_teacher_cache(...) names its cache: where the teacher's outputs come from is
            # decided here, once, and the cache is checked like a named one (a live teacher must be the cache's)
            args.teacher_cache_dir = str(train_dataset.cache.cache_dir)
        self._raw_train_dataset = train_dataset  # as given: each search trial derives its own reading of it
        self.knn_train_dataset = knn_train_dataset
        self.teachers = Teachers(self._resolve_teachers(teacher_model, args), input_spec(student))
        self.teacher_cache = None
        self._eval_logits: dict[bytes, torch.Tensor] = {}  # the teachers' evaluation logits, kept across trials
        self.card_info: dict[str, Any] = {}  # facts for the model card the arguments do not hold (dataset, ...)
        self._timing_cache: dict | None = None
        self._checkpointing = False
        self._search_defaults: dict[str, Any] = {}  # argument values before a hyperparameter search changed them
        self.search_trials: list[dict] = []  # each trial's parameters and metrics (hyperparameter_search)
        self._records: TrialRecords | None = None
        self._steps_per_epoch = 0
        self._built = self._setup(student, args)  # handed to the Trainer (directly, or as its model_init's first)
        split_stream_by_shard(args, self._data.dataset)
        super().__init__(
            model=None if model_init is not None else self._built,
            model_init=self._trial_model if model_init is not None else None,
            args=args,
            data_collator=data_collator or collate_images,
            train_dataset=self._data.dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or self._default_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self._epoch_callback = None
        self._follow_epochs(self._data.dataset)
        self.label_names = ["labels"]  # a timm model's forward(x) names no labels: tell the Trainer where they are
        self.model_accepts_loss_kwargs = False  # compute_loss returns a per-batch mean: the Trainer scales it
        place_teachers(self.teachers, args, self.accelerator.num_processes)
        for line in inert_settings(self, self._data.dataset, eval_dataset, knn_train_dataset):
            logger.warning(line)

    # ------------------------------------------------------------------ one set-up path (construction and trials)
    def _setup(self, student: nn.Module, args) -> DistillationModel:
        """The method, the teacher-output cache's checks, the label spaces, the training data, the trained
        container and the teacher source, for a student: the same for ``__init__`` and every search trial."""
        self.method = method = get_method(args.distill_method)(args)
        teachers = list(self.teachers.models)
        if method.needs_teacher and not teachers and not args.teacher_cache_dir:
            raise ValueError(f"distill_method='{args.distill_method}' needs a teacher: pass teacher_model= or set "
                             "teacher_model_name_or_path")
        if teachers and not method.uses_teacher:
            raise ValueError(f"distill_method='{args.distill_method}' uses no teacher, and one is given: drop "
                             "teacher_model= / teacher_model_name_or_path")
        if self.teacher_cache is None:  # loaded once, checked for every set-up
            self.teacher_cache = open_teacher_cache(args, method, teachers, self._raw_train_dataset)
        else:
            check_teacher_cache(args, method, self.teacher_cache)
        align_label_spaces(method, student, teachers, self._raw_train_dataset)
        self._data = training_data(args, method, student, teachers, self._raw_train_dataset)
        self._term_sums: dict[str, torch.Tensor] = {}  # loss terms summed since the last log (running sums)
        self._term_counts: dict[str, int] = defaultdict(int)
        self.last_loss_terms: dict[str, torch.Tensor] = {}  # the terms of the last training step
        self._stage = Stage()  # the last training step's (its trainable parameters, the values it logs)
        self._evaluation = Evaluation()

        self.student_spec = input_spec(student)
        method.setup(student, teachers)
        layers = method.layers()
        self.teachers = self.teachers.rebuilt(self.student_spec, layers.teacher)
        for line in self.teachers.describe_inputs():
            logger.info(line)
        self.teacher_source = TeacherSource(self.teachers, method, args, self.teacher_cache,
                                            autocast=self._teacher_autocast, eval_logits=self._eval_logits)
        probe = probe_shapes(method, student, self.teachers, self.teacher_cache, self.student_spec)
        set_seed(args.seed)  # the extra modules start the same for the same seed, whatever ran before
        extras = method.build_modules(student, teachers, probe)
        container = DistillationModel(student, extras, method, layers.student, probe)
        if probe.get("teacher"):  # known layouts: no recompile after a first compiled step
            self.teachers.set_layouts({name: layout for name, (_, layout) in probe["teacher"].items()})
        if args.channels_last:
            container.to(memory_format=torch.channels_last)
        if args.sync_batchnorm and args.world_size > 1:
            if args.device.type != "cuda":
                raise ValueError("sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on CPU")
            container = nn.SyncBatchNorm.convert_sync_batchnorm(container)
        return container

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
    def _resolve_teachers(teacher_model, args) -> list[nn.Module]:
        if teacher_model is not None:
            return list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        return [load_model(name, revision=args.teacher_revision) for name in args.teacher_names]

    # ------------------------------------------------------------------ model_init and hyperparameter search
    def _new_student(self, trial) -> nn.Module:
        from transformers.trainer_utils import number_of_arguments

        student = self._student_init(trial) if number_of_arguments(self._student_init) == 1 else self._student_init()
        if isinstance(student, str):
            student = load_model(student)
        if not isinstance(student, nn.Module):
            raise TypeError(f"model_init must return the student (an nn.Module or a name), got {type(student).__name__}")
        return student

    def _trial_model(self, trial=None) -> DistillationModel:
        """The Trainer's model_init: a fresh student (the user's model_init) set up as ``__init__`` sets one up,
        from the trial's arguments. The teachers and the teacher-output cache are kept: loaded once."""
        if self._built is not None:  # the one __init__ built, for the Trainer's own first call
            built, self._built = self._built, None
            return built
        if trial is not None and self.hp_search_backend is not None:
            # the Trainer sets them only after this call; the container depends on them
            params = trial_params(self.hp_search_backend, self.hp_space, trial)
            apply_params(self.args, params, self._search_defaults)
            if self._records is not None:
                self._records.start(params)
            logger.info("trial %s: %s", getattr(trial, "number", ""), params)
            set_seed(self.args.seed)
        container = self._setup(self._new_student(trial), self.args)
        self.train_dataset = self._data.dataset
        self._follow_epochs(self.train_dataset)
        return container

    def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials: int = 20, direction=None,
                              backend=None, hp_name=None, metric: str | None = None, **kwargs):
        """``Trainer.hyperparameter_search`` (Optuna or Ray Tune) over distillation and Trainer arguments.

        ``hp_space``: a search space dict (:mod:`hf_distill.search` format) or the Trainer's function of a trial;
        default: the learning rate and the method's own weights. The objective defaults to the student's
        ``eval_accuracy`` (label-free: ``eval_knn_accuracy``, else ``eval_feature_cosine``), maximised; ``metric``
        names another (``loss`` minimised). Each trial is set up as ``__init__`` sets up a run, with a fresh student
        (``model_init``); teachers and cache are loaded once. ``search_trials`` lists each trial's parameters and
        metrics (Ray Tune: ``best_run.run_summary``); the arguments are restored afterwards."""
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
        self._records = TrialRecords(compute_objective, lambda: self.state)
        self.search_trials = self._records.entries
        if backend == "ray":
            kwargs.setdefault("storage_path", os.path.abspath(os.path.join(self.args.output_dir, "ray_results")))
            # Ray pickles the trainer for its workers; accelerate's shared gradient state still holds weak
            # references to loaders of earlier runs in this process (one stopped at max_steps mid-epoch is never
            # unregistered), which cannot be pickled. No loader is running now: forget them.
            self.accelerator.gradient_state.dataloader_references = [None]
        self._search_defaults = {}
        try:
            return super().hyperparameter_search(hp_space, self._records, n_trials, direction, backend, hp_name,
                                                 **kwargs)
        finally:
            for key, value in self._search_defaults.items():  # the arguments as they were before the search
                setattr(self.args, key, value)
            if self.model is None:  # Ray Tune leaves the Trainer without a model
                self.model = self.model_wrapped = self._trial_model()

    # ------------------------------------------------------------------ what is trained
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
    def mixer(self):
        """The batch mixer (mixup / CutMix), or None."""
        return self._data.mixer

    @property
    def progress(self) -> Progress:
        return self._data.progress(self.state, self.args, self._steps_per_epoch)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._steps_per_epoch = values[1]  # update steps per epoch: schedules run on steps (max_steps, fractions)
        return values

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "ordered_by_epoch", False):
            return torch.utils.data.SequentialSampler(dataset)  # the dataset orders itself per epoch
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ the teachers' outputs
    def teacher_logits(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The teachers' clean logits on a student batch (mean over teachers), without autograd."""
        return self.teacher_source.live(pixel_values)[0]

    def teacher_outputs(self, pixel_values: torch.Tensor, training: bool = True
                        ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(target logits, tapped features) of the live teachers on a student batch, without autograd; in
        training as the current stage needs them (noise, a random ensemble member; see ``TeacherSource.live``)."""
        logits = not training or self.method.stage(self.progress).teacher_logits
        return self.teacher_source.live(pixel_values, training, logits=logits)

    def teacher_feature_maps(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every teacher's backbone features on a student batch: ``{"<teacher index>/summary", ".../spatial"}``."""
        return self.teacher_source.feature_maps(pixel_values)

    # ------------------------------------------------------------------ training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels, training = inputs["pixel_values"], inputs.get("labels"), model.training
        progress = self.progress
        stage = self.method.stage(progress)
        if training:
            self._stage = stage
            if labels is None and stage.labels:
                hint = self.method.without_labels
                raise ValueError(f"the training batches carry no labels, but distill_method="
                                 f"'{self.args.distill_method}' trains on them: give the dataset a label column"
                                 + (f", or {hint}" if hint else ""))
            if self._data.mixer is not None:
                pixel_values, labels = mix_batch(self._data.mixer, inputs, self.args.per_device_train_batch_size,
                                                 len(self.train_dataset), self.accelerator.num_processes)
            for module in stage.held_in_eval:  # after the Trainer's train(): e.g. no BatchNorm updates there
                module.eval()
        pixel_values = self._memory_format(pixel_values)  # once, for the student and every teacher
        out = model(pixel_values=pixel_values, features_only=training and not stage.student_logits,
                    extras=stage.extras)
        teacher_logits, teacher_features = self.teacher_source.outputs(inputs, pixel_values, stage, training)
        n_student = out["logits"].shape[-1] if out["logits"] is not None else None
        if teacher_logits is not None and n_student is not None and teacher_logits.shape[-1] != n_student:
            raise ValueError(f"class-count mismatch: the student outputs {n_student} logits but the teacher "
                             f"outputs {teacher_logits.shape[-1]}")
        step = StepOutputs(student_logits=out["logits"], student_dist_logits=out["heads"].get("dist_head"),
                           labels=labels, teacher_logits=teacher_logits, student_features=out["features"],
                           teacher_features=teacher_features, extra_outputs=out["extra"], progress=progress)
        loss, terms = self.method.loss(step)
        if training:
            self.last_loss_terms = {key: value.detach().float() for key, value in terms.items()}
            for key, value in self.last_loss_terms.items():
                self._term_sums[key] = self._term_sums[key] + value if key in self._term_sums else value
                self._term_counts[key] += 1
        return (loss, out) if return_outputs else loss

    def _memory_format(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.args.channels_last and pixel_values.ndim == 4:
            return pixel_values.contiguous(memory_format=torch.channels_last)
        return pixel_values

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        trainable = self._stage.trainable
        if trainable is not None:
            # Parameters outside the current stage must not move at all (not even by weight
            # decay): optimizers skip parameters whose grad is None.
            for name, param in self.student.named_parameters():
                if name not in trainable:
                    param.grad = None
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # without clipping the Trainer computes the norm of every gradient at each step only to log it (timm's loop
        # makes no such pass): computed on logged steps alone; with clipping it comes from the clip, passed in
        if grad_norm is None and not logs_this_step(self.args, self.state):
            return None  # _maybe_log_save_evaluate reads it only when it logs
        return super()._get_grad_norm(model, grad_norm)

    def _teacher_autocast(self):
        # accelerator.autocast() builds its state and a generator context at every call; without mixed precision
        # it enters a nullcontext: enter that directly
        return self.accelerator.autocast() if self.accelerator.native_amp else nullcontext()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._term_sums and not any(k.startswith("eval_") for k in logs):
            for key, total in self._term_sums.items():
                mean = total / self._term_counts[key]
                logs[key] = round(self.accelerator.reduce(mean, reduction="mean").item(), 6)
            self._term_sums.clear()
            self._term_counts.clear()
            logs.update(self._stage.values)  # as they were for the last step (the state moves on by log time)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Student logits and label cross-entropy (``eval_loss`` is the student's CE for every method), and what
        the method evaluates (``hf_distill.training.evaluation``)."""
        inputs = self._prepare_inputs(inputs)
        inputs["pixel_values"] = self._memory_format(inputs["pixel_values"])
        extras = self.method.stage(self.progress).extras
        with torch.no_grad():
            with self.autocast_smart_context_manager():
                out = model(pixel_values=inputs["pixel_values"], extras=extras)
            return self._evaluation.predict(self, out, inputs, prediction_loss_only)

    def _default_metrics(self, eval_pred) -> dict[str, float]:
        return prediction_metrics(eval_pred, self._evaluation.names)

    def _sync_buffers(self) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics): each process updated its own
        with its own batches since DDP's last broadcast, and rank 0's are the ones saved."""
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            for buffer in self.accelerator.unwrap_model(self.model).buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if is_stream(dataloader.dataset) and self.accelerator.num_processes > 1:
            raise ValueError("evaluating a stream over several processes would give each process a different "
                             "number of batches: evaluate a map-style dataset (load its split without streaming)")
        self._sync_buffers()
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        self._evaluation.start(self, dataloader, loss_only)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        return self._evaluation.finish(self, output, dataloader, metric_key_prefix)

    # ------------------------------------------------------------------ saving & resuming
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint holds the whole student; an export what the user ships (``training.checkpoints``)."""
        if self.args.should_save:
            write_student(self, output_dir if output_dir is not None else self.args.output_dir, state_dict,
                          checkpoint=self._checkpointing)

    def _save_checkpoint(self, model, trial):
        self._checkpointing = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpointing = False
        if self.args.should_save:  # the extra modules live only in checkpoints (to resume), never in exports
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_extras(self.extra_modules, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        container = self.accelerator.unwrap_model(model if model is not None else self.model)
        restore(container, resume_from_checkpoint, self.args.distill_method)

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
        return card_context(self, **overrides)

    def model_card_metrics(self) -> dict[str, float]:
        """The last evaluation's metrics (without ``eval_``), as the card reports them."""
        return card_metrics(self.state)

    def _timing(self) -> dict:
        return timing(self)

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
