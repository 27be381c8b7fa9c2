"""Every transformers.TrainingArguments field works, is refused with a reason, or says it has no effect."""

import dataclasses
import logging

import pytest
import torch
from conftest import tiny_timm
from transformers import TrainingArguments

from hf_distill import DistillationTrainer
from hf_distill.trainer_arguments import NO_EFFECT, REFUSED, SUPPORT, WORKS

# a value other than the default for each refused field (they must be refused, with their reason)
REFUSED_VALUES = {
    "optim_target_modules": ["attn"],
    "use_liger_kernel": True,
    "liger_kernel_config": {"rope": True},
    "neftune_noise_alpha": 5.0,
    "include_num_input_tokens_seen": "all",
    "remove_unused_columns": True,
    "label_names": ["y"],
    "length_column_name": "len",
    "fsdp": "full_shard",
    "fsdp_config": {"min_num_params": 1},
    "deepspeed": "ds_config.json",
}


def test_every_trainer_field_has_a_decision():
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = sorted(fields - set(SUPPORT))
    assert not missing, f"new TrainingArguments fields without a decision in hf_distill/trainer_arguments.py: {missing}"
    assert not set(SUPPORT) - fields, "fields in the table that transformers no longer has"
    assert all(status in (WORKS, REFUSED, NO_EFFECT) for status, _ in SUPPORT.values())
    assert all(note for status, note in SUPPORT.values() if status != WORKS)  # a reason for each


@pytest.mark.parametrize("name", sorted(n for n, (s, _) in SUPPORT.items() if s == REFUSED))
def test_refused_fields_raise_with_their_reason(name, make_args):
    if name == "parallelism_config":
        from accelerate import ParallelismConfig

        value = ParallelismConfig(tp_size=1)
    else:
        value = REFUSED_VALUES[name]
    with pytest.raises(ValueError, match=rf"{name}: {SUPPORT[name][1][:20]}"):
        make_args(**{name: value})


def test_fp16_on_cpu_and_group_by_length_are_refused(make_args):
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU"):
        make_args(fp16=True)
    with pytest.raises(ValueError, match="group_by_length"):
        make_args(train_sampling_strategy="group_by_length")
    make_args(label_names=["labels"])  # what the collator produces: accepted


def test_fields_with_no_effect_say_so(make_args, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainer_arguments"):
        make_args(average_tokens_across_devices=False, do_predict=True)
    assert "average_tokens_across_devices" in caplog.text and "do_predict" in caplog.text
    assert "no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainer_arguments"):
        make_args(eval_strategy="steps", eval_steps=2)  # transformers sets do_eval itself: no warning
    assert "do_eval" not in caplog.text


# --- a few fields that work through paths distillation changes --------------------------------------------


def test_eval_without_concatenating_batches_gives_the_same_accuracy(digits_small, make_args):
    train, evaluation = digits_small
    student = tiny_timm(seed=1)
    metrics = [DistillationTrainer(model=student, teacher_model=tiny_timm(seed=2), eval_dataset=evaluation,
                                   args=make_args(eval_do_concat_batches=concat, per_device_eval_batch_size=24)
                                   ).evaluate()["eval_accuracy"] for concat in (True, False)]
    assert metrics[0] == metrics[1]


def test_bf16_full_eval_casts_the_student_not_the_teacher(digits_small, make_args):
    train, evaluation = digits_small
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), eval_dataset=evaluation,
                            args=make_args(bf16_full_eval=True))
    full = t.evaluate()
    assert 0.0 <= full["eval_accuracy"] <= 1.0
    assert next(t.teachers.parameters()).dtype == torch.float32


def test_load_best_model_at_end_restores_the_best_checkpoint_with_its_extra_modules(digits_small, make_args):
    train, evaluation = digits_small
    t = DistillationTrainer(model=tiny_timm(seed=1), train_dataset=train, eval_dataset=evaluation,
                            args=make_args(distill_method="byot", max_steps=6, eval_strategy="steps", eval_steps=2,
                                           save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                                           metric_for_best_model="accuracy", learning_rate=0.05))
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None
    from safetensors.torch import load_file

    saved = load_file(f"{best}/model.safetensors")
    extras = load_file(f"{best}/distill_modules.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in t.student.state_dict().items())
    assert all(torch.equal(extras[k], v) for k, v in t.extra_modules.state_dict().items())


def test_auto_find_batch_size_and_empty_cache_steps_train(digits_small, make_args):
    train, _ = digits_small
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=train,
                            args=make_args(auto_find_batch_size=True, torch_empty_cache_steps=1))
    t.train()
    assert t.state.global_step == 4
