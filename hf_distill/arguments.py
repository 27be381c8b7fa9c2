"""Arguments: ``DistillationTrainingArguments`` (a ``TrainingArguments``) plus the CLI's model/data groups."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from transformers import TrainingArguments

from .losses import DISTILL_LOSSES
from .methods import METHODS, get_method
from .trainer_arguments import SpeedArguments

# Each method may bring a dataclass of its own arguments; they all join one argument class,
# so a new method adds its fields in its own module.
METHOD_ARGUMENTS = tuple(dict.fromkeys(m.arguments for m in METHODS.values() if m.arguments is not None))

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
_SECRET_FIELDS = ("hub_token", "push_to_hub_token")


@dataclass
class DistillationTrainingArguments(*METHOD_ARGUMENTS, SpeedArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus what distillation needs.

    Every Trainer argument still works. Method-specific arguments are documented with their
    method; the defaults follow ``docs/methods.md``.
    """

    teacher_model_name_or_path: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Teacher to load when none is passed to the trainer: a timm name, `hf-hub:org/name`, "
            "`local-dir:PATH`, a transformers repo id or a local folder. Several values give several teachers."
        },
    )
    teacher_revision: Optional[str] = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of the teacher."}
    )
    distill_method: str = field(
        default="kd", metadata={"help": f"Distillation method, one of: {', '.join(sorted(METHODS))}."}
    )
    temperature: Optional[float] = field(
        default=None,
        metadata={
            "help": "Softmax temperature T of the soft targets. Default depends on the method: "
            + ", ".join(f"{n}={m.default_temperature}" for n, m in sorted(METHODS.items()))
            + "."
        },
    )
    alpha: Optional[float] = field(
        default=None,
        metadata={"help": "Weight of the teacher term; (1 - alpha) weighs the label cross-entropy. Default 0.9 (1.0 "
                  "for function_matching). dkd and dist weigh their terms with their own arguments instead."},
    )
    distill_loss: Optional[str] = field(
        default=None,
        metadata={
            "help": "Teacher term of KD-style losses: `kl` (T^2 * KL of temperature-softened outputs), `mse` "
            "(1/2 * ||z_s - z_t||^2 logit regression) or `hard` (CE against the teacher's argmax, DeiT's hard "
            "distillation; several teachers: the argmax of their mean). Default: `mse` for noisy_teacher, `kl` "
            "otherwise."
        },
    )
    logit_standardization: bool = field(
        default=False,
        metadata={"help": "Z-score each sample's logits (teacher and student) before the temperature softmax of the "
                  "KL teacher term (Sun et al., CVPR 2024): kd, noisy_teacher and fitnets with distill_loss kl, "
                  "byot's teacher term, dkd. The label CE keeps the raw logits."},
    )
    teacher_noise_std: Optional[float] = field(
        default=None,
        metadata={
            "help": "Noisy teacher sigma: perturbed logits are z_t * (1 + xi), xi ~ N(0, sigma^2), fresh each "
            "step, training only. Default 0 (0.2 for noisy_teacher)."
        },
    )
    teacher_noise_prob: Optional[float] = field(
        default=None,
        metadata={"help": "Noisy teacher alpha: probability that a sample's teacher logits are perturbed. "
                  "Default 0 (0.5 for noisy_teacher)."},
    )
    mixup_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "Mixup alpha (timm's meaning; > 0 turns mixup on). Every training batch is mixed once, "
                  "before the student and every teacher see it (the teacher's target is teacher(mix(x))); the label "
                  "term learns the mixed soft labels. Default 0 (1.0 for function_matching)."},
    )
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix alpha (timm's meaning; > 0 turns CutMix on)."})
    cutmix_minmax: Optional[list[float]] = field(
        default=None, metadata={"help": "CutMix box size ratios (min max) instead of cutmix_alpha (timm's meaning)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch (or element) (1.0)."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "With mixup and CutMix both on, probability of CutMix instead of mixup (0.5)."})
    mixup_mode: str = field(
        default="batch", metadata={"help": "Mixing parameters per `batch`, `pair` or `elem` (timm's meaning).",
                                   "choices": ["batch", "pair", "elem"]})
    teacher_ensemble: str = field(
        default="mean",
        metadata={"help": "With several teachers: `mean` averages their logits, `random` draws one per batch."},
    )
    sync_batchnorm: bool = field(
        default=False,
        metadata={"help": "Multi-GPU: convert the student's (and extra modules') BatchNorm to SyncBatchNorm so "
                  "statistics span all processes (GPU only). Default: per-process statistics, as plain DDP."},
    )
    teacher_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Teacher-output cache (`hf-distill cache-teacher`): training reads soft labels from it "
                  "instead of running the teacher; no teacher needs to be loaded."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": f"dtype of the teacher's weights, one of {', '.join(TEACHER_DTYPES)}; `auto` follows "
            "--bf16/--fp16 on an accelerator and float32 otherwise."
        },
    )
    teacher_sharding: str = field(
        default="none",
        metadata={"help": "`fsdp`: shard each teacher over the processes with PyTorch FSDP2 (fully_shard on its blocks), "
                  "so each holds about 1/N of its weights; for teachers too large to replicate. Every process runs "
                  "the teacher's forward at every step. `none` (default): a whole teacher on every process.",
                  "choices": ["none", "fsdp"]},
    )
    teacher_device: Optional[str] = field(
        default=None,
        metadata={"help": "Device for the teachers (e.g. `cuda:1`), when a large teacher should not share the "
                  "student's accelerator; batches go there and the outputs come back. Default: the student's device."},
    )
    eval_teacher: bool = field(
        default=True,
        metadata={"help": "Also report the teacher's accuracy (`eval_teacher_accuracy`), computed once per evaluation "
                  "dataset."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Kept False: image columns are turned into `pixel_values` by a dataset transform, and timm "
            "models' `forward(x)` signature would make the Trainer drop them."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "CLI: train even if output_dir already holds a saved model, which is then replaced "
                  "(resuming from a checkpoint in it needs no overwrite)."},
    )

    def __post_init__(self):
        from .trainer_arguments import check_trainer_arguments

        # first, on the values as given: transformers would normalise them (do_eval from eval_strategy, ...)
        # or fail on them with its own, less telling, errors (deepspeed without DeepSpeed, ...)
        from .argument_checks import raise_problems, range_problems, type_problems

        method = get_method(self.distill_method)  # raises with the list of valid names
        # types, ranges and options of other methods, all in one line, before transformers reads them
        raise_problems(type_problems(self) + range_problems(self) + unused_options(self, method))
        check_trainer_arguments(self)
        _bf16_on_cpu(self)
        super().__post_init__()
        if self.dataloader_pin_memory and (self.use_cpu or not _has_accelerator()):
            # pinned memory serves host-to-accelerator copies; without one torch warns at every dataloader
            self.dataloader_pin_memory = False
        if self.temperature is None:
            self.temperature = method.default_temperature
        for key, value in method.preset.items():  # a method's defaults for arguments left unset
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.alpha is None:
            self.alpha = 0.9
        self.mixup_alpha = self.mixup_alpha or 0.0
        self.distill_loss = self.distill_loss or "kl"
        self.teacher_noise_std = self.teacher_noise_std or 0.0
        self.teacher_noise_prob = self.teacher_noise_prob or 0.0
        self.check_distillation()

    def check_distillation(self) -> None:
        """Check the distillation arguments together (also after a hyperparameter-search trial set some)."""
        method = get_method(self.distill_method)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.mixing.validate()
        if self.mixing.enabled and not method.mixes:
            raise ValueError(f"distill_method='{self.distill_method}' cannot train on mixed images: {method.no_mixing}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}, got '{self.distill_loss}'")
        if self.logit_standardization and (self.distill_loss != "kl" or not method.standardizes_logits):
            raise ValueError("logit_standardization applies to the KL teacher term of kd, noisy_teacher, fitnets, "
                             f"byot and dkd (distill_loss kl), not to distill_method='{self.distill_method}' with "
                             f"distill_loss '{self.distill_loss}'")
        if self.teacher_noise_std < 0 or not 0.0 <= self.teacher_noise_prob <= 1.0:
            raise ValueError("teacher_noise_std must be >= 0 and teacher_noise_prob in [0, 1]")
        if self.teacher_ensemble not in ("mean", "random"):
            raise ValueError(f"teacher_ensemble must be 'mean' or 'random', got '{self.teacher_ensemble}'")
        if self.teacher_sharding not in ("none", "fsdp"):
            raise ValueError(f"teacher_sharding must be 'none' or 'fsdp', got '{self.teacher_sharding}'")
        if self.teacher_sharding == "fsdp" and self.teacher_ensemble == "random":
            raise ValueError("teacher_ensemble='random' cannot run sharded teachers: a sharded forward is collective, "
                             "so every process must run the same teachers at every step")
        if self.teacher_sharding == "fsdp" and self.teacher_device:
            raise ValueError("teacher_sharding='fsdp' places each shard on its process's device: drop teacher_device")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got '{self.teacher_dtype}'")
        method.validate(self)

    def __getstate__(self):
        # Pickled arguments end up in training_args.bin next to every saved model and checkpoint, and
        # pushes upload them: access tokens must never be part of them.
        state = self.__dict__.copy()
        for key in _SECRET_FIELDS:
            if key in state:
                state[key] = None
        return state

    @property
    def mixing(self):
        """The Mixup / CutMix settings (:class:`hf_distill.mixing.MixingConfig`)."""
        from .mixing import MixingConfig

        return MixingConfig.from_args(self)

    @property
    def teacher_names(self) -> list[str]:
        """``teacher_model_name_or_path`` as a list (it may be given as one string)."""
        value = self.teacher_model_name_or_path
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)


def method_options() -> dict[str, list[str]]:
    """``{argument: methods that read it}`` for the arguments methods bring (their ``arguments`` dataclass, and
    ``also_uses`` for those borrowed from another method) plus ``alpha``."""
    users: dict[str, list[str]] = {"alpha": [name for name, m in METHODS.items() if m.uses_alpha]}
    for name, m in METHODS.items():
        own = [f.name for f in fields(m.arguments)] if m.arguments is not None else []
        for option in (*own, *getattr(m, "also_uses", ())):
            users.setdefault(option, []).append(name)
    return users


def unused_options(args, method) -> list[str]:
    """Arguments set away from their default that ``method`` does not read, each with the methods that do."""
    defaults = {f.name: f.default for f in fields(DistillationTrainingArguments)}
    unused = []
    for option, users in method_options().items():
        if method.name in users or getattr(args, option, None) == defaults.get(option):
            continue
        if option == "alpha":
            unused.append(f"alpha: {method.alpha_instead}" if method.alpha_instead else "alpha")
        else:
            unused.append(f"{option} (an option of {', '.join(users)})")
    if not unused:
        return []
    return [f"distill_method='{method.name}' does not use " + "; ".join(unused)]


def _has_accelerator() -> bool:
    from .trainer_arguments import _has_accelerator as has

    return has()


def _bf16_on_cpu(args) -> None:
    """bf16 autocast runs on CPU (accelerate supports it there), but transformers asks for use_cpu=True on a
    machine without an accelerator: that machine has nothing else to run on, so it is set."""
    if args.bf16 and not args.use_cpu and not _has_accelerator():
        import torch

        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            args.use_cpu = True


@dataclass
class ModelArguments:
    """Which student to train (the teacher is in the training arguments)."""

    student_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Student: a timm name, `hf-hub:org/name`, `local-dir:PATH`, a transformers repo id or folder."},
    )
    student_pretrained: bool = field(
        default=True,
        metadata={"help": "For a timm architecture name: start from its pretrained weights (False: random init)."},
    )
    student_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the student."})
    teacher_pretrained: bool = field(
        default=True, metadata={"help": "For a timm architecture name given as teacher: load its pretrained weights."}
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hugging Face cache folder for models."})
    in_chans: Optional[int] = field(
        default=None, metadata={"help": "Input channels for timm students built by name (1 for grey images)."}
    )
    image_size: Optional[list[int]] = field(
        default=None, metadata={"help": "Input resolution the student is trained at: one value (square) or two (height "
                                "width); default: its data config."}
    )

    def __post_init__(self):
        from .argument_checks import raise_problems, range_problems

        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            self.image_size = [self.image_size]
        problems = range_problems(self)
        if self.image_size is not None and len(self.image_size) not in (1, 2):
            problems.append(f"image_size takes one value (square) or two (height width), got {self.image_size}")
        raise_problems(problems)

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """``image_size`` as (height, width), or None."""
        if not self.image_size:
            return None
        return (self.image_size[0], self.image_size[-1])


@dataclass
class DataArguments:
    """Where the images come from and how they are read."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "A Hub dataset name, a folder saved with `save_to_disk`, an image folder "
            "(`imagefolder` layout: one sub-folder per class), or `sklearn-digits` (embedded, offline)."
        },
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Split used for evaluation (default: `validation`, else `test`, else a held-out part of train)."},
    )
    eval_fraction: float = field(
        default=0.15, metadata={"help": "Fraction of train held out for evaluation when no eval split exists."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the class ids."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep only this many training images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep only this many evaluation images."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training split as a stream (datasets' streaming=True: Hub datasets and image "
                  "folders are read as training goes, never all on disk or in memory; several processes read their "
                  "own shards), shuffled in a buffer of 10,000 examples, reshuffled each epoch. Needs --max_steps "
                  "and an evaluation split, which is loaded whole. --max_train_samples keeps the first N of the "
                  "shuffled stream. Not with a teacher-output cache or mixup / CutMix."},
    )
    knn_split: Optional[str] = field(
        default=None,
        metadata={"help": "Feature distillation: a labelled split (e.g. `train`) whose features are the k-NN "
                  "classifier's memory, to report eval_knn_accuracy (student) and eval_teacher_knn_accuracy on a "
                  "labelled evaluation split (DINO's k-NN: k=20, cosine). A split of --knn_dataset_name when it is "
                  "given (default there: `train`)."},
    )
    knn_max_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many (random) images of --knn_split."})
    knn_dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Feature distillation: a separate labelled dataset (Hub name or folder, as --dataset_name) "
                  "for k-NN evaluation, e.g. when training on an unlabelled folder: its --knn_split (default `train`) "
                  "is the k-NN memory and its evaluation split (validation, else test, else a held-out part) is "
                  "classified."},
    )
    knn_dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Hub configuration name of --knn_dataset_name."})
    knn_image_column_name: Optional[str] = field(
        default=None, metadata={"help": "Image column of --knn_dataset_name (default: --image_column_name)."})
    knn_label_column_name: Optional[str] = field(
        default=None, metadata={"help": "Label column of --knn_dataset_name (default: --label_column_name)."})
    train_augmentation: str = field(
        default="none",
        metadata={"help": "`none` (resize + normalise) or `timm` (timm's training transform: random resized crop, flip)."},
    )

    def __post_init__(self):
        from .argument_checks import raise_problems, range_problems

        problems = range_problems(self)
        if self.train_augmentation not in ("none", "timm"):
            problems.append(f"train_augmentation must be 'none' or 'timm', got '{self.train_augmentation}'")
        raise_problems(problems)
