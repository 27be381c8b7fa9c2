"""What each ``transformers.TrainingArguments`` field does under distillation.

Every field is in :data:`SUPPORT`, as one of:

* ``"works"``: it does what transformers documents (through the Trainer, or through
  hf_distill where distillation changes the path: label smoothing reaches the label term,
  gradient checkpointing reaches the student, ...);
* ``"refused"``: setting it to anything but its default raises with the reason, because
  it cannot work for image distillation (it targets language models, or a path hf_distill
  does not support);
* ``"no effect"``: accepted, but meaningless here by nature (token counts, generation
  caches, flags read only by scripts); setting it logs a warning with the reason.

``tests/test_trainer_arguments.py`` fails when transformers adds a field this table does
not cover, so none is ever ignored silently.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

logger = logging.getLogger(__name__)

WORKS, REFUSED, NO_EFFECT = "works", "refused", "no effect"

_LLM = "it targets language models (text tokens, decoder layers); image classifiers have none"

# field -> (status, note). Notes of refused / no-effect fields are shown to users.
SUPPORT: dict[str, tuple[str, str]] = {
    # where and how long
    "output_dir": (WORKS, ""),
    "per_device_train_batch_size": (WORKS, ""),
    "num_train_epochs": (WORKS, ""),
    "max_steps": (WORKS, "schedules (FitNets' annealing) follow the step count"),
    # optimisation
    "learning_rate": (WORKS, ""),
    "lr_scheduler_type": (WORKS, ""),
    "lr_scheduler_kwargs": (WORKS, ""),
    "warmup_steps": (WORKS, ""),
    "optim": (WORKS, "the student and the method's extra modules are optimised together"),
    "optim_args": (WORKS, ""),
    "weight_decay": (WORKS, ""),
    "adam_beta1": (WORKS, ""),
    "adam_beta2": (WORKS, ""),
    "adam_epsilon": (WORKS, ""),
    "optim_target_modules": (REFUSED, "it selects language-model layers for GaLore/APOLLO-style optimizers, which "
                             "hf_distill does not support for image students"),
    "gradient_accumulation_steps": (WORKS, "the loss is a per-batch mean, scaled by the Trainer"),
    "average_tokens_across_devices": (NO_EFFECT, "losses here are per-batch means over images, not token counts"),
    "max_grad_norm": (WORKS, ""),
    "label_smoothing_factor": (WORKS, "smooths the label cross-entropy term of every method (not the teacher term)"),
    # precision and memory
    "bf16": (WORKS, "autocast for the student and the teachers; teacher weights in bf16 on an accelerator "
             "(teacher_dtype='auto')"),
    "fp16": (WORKS, "CUDA only: accelerate runs no fp16 autocast on CPU, so it is refused there"),
    "bf16_full_eval": (WORKS, "the student (and its extra modules) are cast for evaluation; teachers keep "
                       "teacher_dtype"),
    "fp16_full_eval": (WORKS, "as bf16_full_eval"),
    "tf32": (WORKS, "Ampere or newer GPUs (transformers refuses it elsewhere)"),
    "activation_checkpointing": (WORKS, "reaches the student: timm set_grad_checkpointing, transformers "
                                 "gradient_checkpointing_enable; plain modules are refused"),
    "activation_checkpointing_kwargs": (WORKS, "transformers students only; timm takes no options"),
    "gradient_checkpointing": (WORKS, "alias of activation_checkpointing"),
    "gradient_checkpointing_kwargs": (WORKS, "alias of activation_checkpointing_kwargs"),
    "torch_compile": (WORKS, "compiles the student with the method's extra modules and feature taps (FitNets' "
                      "early stop too; no graph break for any method); the teachers follow (teacher_compile)"),
    "torch_compile_backend": (WORKS, "also the teachers', unless teacher_compile_backend is set"),
    "torch_compile_mode": (WORKS, "also the teachers', unless teacher_compile_mode is set"),
    "use_liger_kernel": (REFUSED, _LLM),
    "liger_kernel_config": (REFUSED, _LLM),
    "use_cache": (NO_EFFECT, "a generation cache of language models"),
    "neftune_noise_alpha": (REFUSED, "NEFTune perturbs token embeddings of language models"),
    "torch_empty_cache_steps": (WORKS, ""),
    "auto_find_batch_size": (WORKS, "on an out-of-memory error the Trainer retries with half the batch"),
    # logging
    "logging_strategy": (WORKS, "every loss term is logged next to the loss"),
    "logging_steps": (WORKS, ""),
    "logging_first_step": (WORKS, ""),
    "log_on_each_node": (WORKS, ""),
    "logging_nan_inf_filter": (WORKS, ""),
    "include_num_input_tokens_seen": (REFUSED, "it counts text tokens; the batches here are images"),
    "log_level": (WORKS, ""),
    "log_level_replica": (WORKS, ""),
    "disable_tqdm": (WORKS, "the CLI disables it when output is not a terminal and prints a line per log instead"),
    "report_to": (WORKS, ""),
    "run_name": (WORKS, ""),
    "project": (WORKS, ""),
    "trackio_space_id": (WORKS, ""),
    "trackio_bucket_id": (WORKS, ""),
    "trackio_static_space_id": (WORKS, ""),
    # evaluation
    "eval_strategy": (WORKS, "student accuracy, teacher accuracy (once per dataset), per-exit/branch accuracies"),
    "eval_steps": (WORKS, ""),
    "eval_delay": (WORKS, ""),
    "per_device_eval_batch_size": (WORKS, "the CLI defaults it to the training batch size"),
    "prediction_loss_only": (WORKS, ""),
    "eval_on_start": (WORKS, ""),
    "eval_do_concat_batches": (WORKS, "the default accuracy metric joins the batches itself when it is False"),
    "eval_use_gather_object": (WORKS, ""),
    "eval_accumulation_steps": (WORKS, ""),
    "include_for_metrics": (WORKS, "for your own compute_metrics"),
    "batch_eval_metrics": (WORKS, "needs your own compute_metrics (the default scores the whole set at once)"),
    # saving and the Hub
    "save_only_model": (WORKS, ""),
    "save_strategy": (WORKS, "checkpoints hold the student and the method's extra modules"),
    "save_steps": (WORKS, ""),
    "save_on_each_node": (WORKS, ""),
    "save_total_limit": (WORKS, ""),
    "enable_jit_checkpoint": (WORKS, "the checkpoint taken on SIGTERM holds the extra modules too"),
    "push_to_hub": (WORKS, "the student in its own library's format, with its card; tokens never reach saved files"),
    "hub_token": (WORKS, "never pickled, saved or pushed"),
    "hub_private_repo": (WORKS, ""),
    "hub_model_id": (WORKS, ""),
    "hub_strategy": (WORKS, ""),
    "hub_always_push": (WORKS, ""),
    "hub_revision": (WORKS, ""),
    "load_best_model_at_end": (WORKS, "the student and the extra modules of the best checkpoint are restored"),
    "metric_for_best_model": (WORKS, ""),
    "greater_is_better": (WORKS, ""),
    # resuming and reproducibility
    "ignore_data_skip": (WORKS, ""),
    "restore_callback_states_from_checkpoint": (WORKS, ""),
    "full_determinism": (WORKS, ""),
    "seed": (WORKS, "also seeds teacher noise and random teacher choice"),
    "data_seed": (WORKS, ""),
    # devices and data loading
    "use_cpu": (WORKS, ""),
    "accelerator_config": (WORKS, ""),
    "parallelism_config": (REFUSED, "tensor / context parallelism shard language models; use data parallel "
                           "training (torchrun / accelerate launch)"),
    "dataloader_drop_last": (WORKS, ""),
    "dataloader_num_workers": (WORKS, ""),
    "dataloader_pin_memory": (WORKS, ""),
    "dataloader_persistent_workers": (WORKS, "not with a teacher-output cache or mixup / CutMix (their epochs change the items)"),
    "dataloader_prefetch_factor": (WORKS, ""),
    "dataloader_multiprocessing_context": (WORKS, ""),
    "dataloader_in_order": (WORKS, ""),
    "remove_unused_columns": (REFUSED, "it would drop the image column before the transform makes pixel_values "
                              "(a timm model's forward(x) names no input column); it stays False"),
    "label_names": (REFUSED, "batches carry their labels as 'labels' (the collator renames 'label'); choose the "
                    "dataset column with label_column_name instead"),
    "train_sampling_strategy": (WORKS, "'random' or 'sequential'; 'group_by_length' and 'batch_rebalance' are "
                                "refused (they sort or balance texts by token count)"),
    "length_column_name": (REFUSED, "it serves group_by_length, which sorts texts by length"),
    # distributed training
    "ddp_find_unused_parameters": (WORKS, "set automatically where a method leaves parameters unused (FitNets, SFTN)"),
    "ddp_bucket_cap_mb": (WORKS, ""),
    "ddp_broadcast_buffers": (WORKS, ""),
    "ddp_static_graph": (WORKS, "not with FitNets' stage-wise training (the trained parameters change)"),
    "ddp_backend": (WORKS, ""),
    "ddp_timeout": (WORKS, ""),
    "fsdp": (REFUSED, "sharding the student with FSDP is not supported: use data parallel training"),
    "fsdp_config": (REFUSED, "sharding the student with FSDP is not supported: use data parallel training"),
    "deepspeed": (REFUSED, "DeepSpeed is not supported: saving writes the student in its own library's format, "
                  "which needs the whole student on one process"),
    "debug": (WORKS, ""),
    "skip_memory_metrics": (WORKS, ""),
    # read by scripts, not by the Trainer
    "do_train": (NO_EFFECT, "the Trainer does not read it; `hf-distill train` always trains"),
    "do_eval": (NO_EFFECT, "the Trainer does not read it; `hf-distill train` evaluates whenever there is an "
                "evaluation split"),
    "do_predict": (NO_EFFECT, "the Trainer does not read it; call trainer.predict(dataset)"),
    "resume_from_checkpoint": (WORKS, "the CLI passes it to train(); in Python pass it to trainer.train()"),
    "local_rank": (WORKS, "set by the launcher"),
}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _is_default(value, default) -> bool:
    if default is dataclasses.MISSING:
        return True
    if value == default:
        return True
    # transformers normalises some fields in __post_init__ (enums, "no" strings, empty containers)
    value = getattr(value, "value", value)
    if value in (None, False, "", "no", [], {}) and default in (None, False, "", "no", [], {}):
        return True
    return str(value) == str(default)


def check_trainer_arguments(args) -> None:
    """Raise for refused Trainer fields set to a non-default value; warn for fields with no effect.

    Called on the values as given, before ``TrainingArguments.__post_init__`` normalises them.
    """
    from transformers import TrainingArguments

    refused, inert = [], []
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for f in dataclasses.fields(type(args)):  # defaults as the subclass sets them
        if f.name not in trainer_fields:
            continue
        status, note = SUPPORT.get(f.name, (WORKS, ""))
        if status == WORKS:
            continue
        value = getattr(args, f.name, None)
        if _is_default(value, _default(f)) or (f.name == "label_names" and list(value) == ["labels"]):
            continue
        (refused if status == REFUSED else inert).append(f"{f.name}: {note}")
    if getattr(args, "train_sampling_strategy", "random") in ("group_by_length", "batch_rebalance"):
        refused.append(f"train_sampling_strategy='{args.train_sampling_strategy}': it sorts or balances texts by their "
                       "token count; images have none")
    if args.fp16 and (args.use_cpu or not _has_accelerator()):
        refused.append("fp16: fp16 mixed precision needs a CUDA GPU (accelerate runs no fp16 autocast on CPU); on "
                       "CPU use bf16, or teacher_dtype='float16' for the teacher alone")
    for line in inert:
        logger.warning("%s (no effect)", line)
    if refused:
        raise ValueError("these Trainer arguments cannot be used for distillation:\n  - " + "\n  - ".join(refused))


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class SpeedArguments:
    """Speed switches of distillation itself (the Trainer's own are ``torch_compile`` and friends): the
    teachers compiled for inference, and the channels-last memory format. A base of
    ``DistillationTrainingArguments``, so each field is also a CLI flag."""

    teacher_compile: Optional[bool] = field(
        default=None,
        metadata={"help": "Compile each teacher for inference (torch.compile, run in inference mode with its weights in "
                  "teacher_dtype), live and when building a teacher cache. Default: follows --torch_compile (not for "
                  "sharded teachers, which stay eager; asking for it with --teacher_sharding fsdp is refused)."},
    )
    teacher_compile_backend: Optional[str] = field(
        default=None,
        metadata={"help": "torch.compile backend for the teachers (setting it turns teacher_compile on). Default: "
                  "--torch_compile_backend, else `inductor`."},
    )
    teacher_compile_mode: Optional[str] = field(
        default=None,
        metadata={"help": "torch.compile mode for the teachers (`default`, `reduce-overhead`, `max-autotune`; setting "
                  "it turns teacher_compile on). Default: --torch_compile_mode."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Student, extra modules and teachers in the channels-last memory format, each batch converted "
                  "once (faster convolutions on GPUs, mostly with --bf16/--fp16; no effect on the values)."},
    )

    def __post_init__(self):
        super().__post_init__()  # TrainingArguments: torch_compile is now set from its backend / mode
        chosen = self.teacher_compile_backend is not None or self.teacher_compile_mode is not None
        if chosen and self.teacher_compile is False:
            raise ValueError("teacher_compile_backend / teacher_compile_mode are set but teacher_compile=False: drop "
                             "them, or drop teacher_compile=False")
        if (self.teacher_compile or chosen) and getattr(self, "teacher_sharding", "none") == "fsdp":
            raise ValueError("teacher_compile with teacher_sharding='fsdp' is not supported (compiling an FSDP2-sharded "
                             "teacher is untested here): drop one of them")

    @property
    def teacher_compile_options(self) -> Optional[dict]:
        """``torch.compile`` keywords for the teachers, or None when they run eager."""
        chosen = self.teacher_compile_backend is not None or self.teacher_compile_mode is not None
        on = self.teacher_compile if self.teacher_compile is not None else (
            chosen or (self.torch_compile and getattr(self, "teacher_sharding", "none") != "fsdp"))
        if not on:
            return None
        return {"backend": self.teacher_compile_backend or self.torch_compile_backend or "inductor",
                "mode": self.teacher_compile_mode if self.teacher_compile_mode is not None else self.torch_compile_mode}
