import json
import os

import pytest
import torch
from conftest import PlainClassifier, tiny_hf_resnet, tiny_timm
from torch import nn
from transformers import TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images
from hf_distill.losses import kd_loss
from hf_distill.methods import METHODS, DistillationMethod
from hf_distill.models import call_model


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compute_loss_is_kd_of_student_and_teacher_logits(digits_small, make_args):
    train, _ = digits_small
    student, teacher = tiny_hf_resnet(seed=1), tiny_timm(seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(temperature=3.0, alpha=0.7),
                                  train_dataset=train)
    batch = collate_images([train[i] for i in range(8)])
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        want, _ = kd_loss(student(pixel_values=batch["pixel_values"]).logits, teacher(batch["pixel_values"]),
                          batch["labels"], 3.0, 0.7)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_training_updates_student_and_never_the_teacher(digits_small, make_args):
    train, evaluation = digits_small
    student, teacher = tiny_hf_resnet(seed=1), tiny_timm(seed=2)
    s0, t0 = _params(student), _params(teacher)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(),
                                  train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items() if v.is_floating_point())
    for k, v in teacher.state_dict().items():  # BatchNorm running stats included: eval mode held
        assert torch.equal(t0[k], v), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    # the teacher is not part of what the optimizer or the Trainer's model sees
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert not any(p is q for p in trainer.model.parameters() for q in teacher.parameters())


@pytest.mark.parametrize("pair", ["timm_teacher_hf_student", "hf_teacher_timm_student", "plain_modules"])
def test_cross_family_distillation_logs_terms_and_accuracies(pair, digits_small, make_args):
    train, evaluation = digits_small
    student, teacher = {
        "timm_teacher_hf_student": (tiny_hf_resnet(seed=1), tiny_timm(seed=2)),
        "hf_teacher_timm_student": (tiny_timm(seed=1), tiny_hf_resnet(seed=2)),
        "plain_modules": (PlainClassifier(seed=1), PlainClassifier(seed=2)),
    }[pair]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(),
                                  train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"loss_ce", "loss_kd"} <= set(h) for h in logged)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    # the teacher's accuracy is measured on the same eval data: check it by hand
    teacher.eval()
    with torch.no_grad():
        batch = collate_images([evaluation[i] for i in range(len(evaluation))])
        want = (call_model(teacher, batch["pixel_values"]).argmax(-1) == batch["labels"]).float().mean().item()
    assert metrics["eval_teacher_accuracy"] == pytest.approx(want)


def test_save_model_writes_the_student_alone_and_reloads_identically(digits_small, make_args, tmp_path):
    import timm

    train, _ = digits_small
    student, teacher = tiny_timm(seed=1), tiny_hf_resnet(seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(), train_dataset=train)
    trainer.train()
    out = tmp_path / "export"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors"} <= files
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(student.state_dict())  # nothing of the teacher, no wrapper prefix
    assert json.loads((out / "config.json").read_text())["architecture"] == "test_resnet"
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student.eval()
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(student(x), reloaded(x))
    # no token can leak through the saved arguments
    saved_args = torch.load(out / "training_args.bin", weights_only=False)
    assert saved_args.hub_token is None


def test_missing_teacher_and_bad_arguments_raise_clear_errors(make_args):
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=tiny_timm(), args=make_args())
    with pytest.raises(ValueError, match=r"predicts 10 classes.*predicts 3"):
        DistillationTrainer(model=tiny_timm(), teacher_model=tiny_hf_resnet(num_labels=3), args=make_args())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_args(temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        make_args(alpha=1.5)
    with pytest.raises(ValueError, match="valid methods: .*kd.*supervised"):
        make_args(distill_method="kdd")


def test_class_count_mismatch_found_at_first_step_for_plain_modules(digits_small, make_args):
    train, _ = digits_small
    trainer = DistillationTrainer(model=PlainClassifier(), teacher_model=PlainClassifier(num_classes=4),
                                  args=make_args(), train_dataset=train)
    with pytest.raises(ValueError, match="student outputs 10 logits but the teacher outputs 4"):
        trainer.train()


class _StopAt(TrainerCallback):
    """Simulates a run killed right after the checkpoint at `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


class ScaledKD(DistillationMethod):
    """A toy method with one extra trainable module: exercises the plug-in point."""

    name = "scaled_kd_test"

    def build_modules(self, student, teachers, probe):
        return nn.ModuleDict({"scale": nn.Linear(10, 10)})

    def forward_modules(self, modules, features):
        return {"scale": modules["scale"]}

    def loss(self, out):
        logits = out.extra_outputs["scale"](out.student_logits)
        return kd_loss(logits, out.teacher_logits, out.labels, self.args.temperature, self.args.alpha)


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(METHODS, ScaledKD.name, ScaledKD)
    return ScaledKD.name


def _run(make_args, train, method, out, max_steps, stop_at=None, resume=None):
    args = make_args(output_dir=str(out), distill_method=method, max_steps=max_steps, save_strategy="steps",
                     save_steps=2, learning_rate=5e-3, warmup_steps=1, weight_decay=0.01)
    trainer = DistillationTrainer(model=tiny_hf_resnet(seed=1), teacher_model=tiny_timm(seed=2), args=args,
                                  train_dataset=train, callbacks=[_StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("method", ["kd", "toy"])
def test_resume_from_checkpoint_reaches_the_same_weights(method, digits_small, make_args, tmp_path, request):
    train, _ = digits_small
    if method == "toy":
        method = request.getfixturevalue("toy_method")
    full = _run(make_args, train, method, tmp_path / "full", max_steps=6)
    _run(make_args, train, method, tmp_path / "killed", max_steps=6, stop_at=2)
    ckpt = tmp_path / "killed" / "checkpoint-2"
    assert ckpt.exists()
    resumed = _run(make_args, train, method, tmp_path / "killed", max_steps=6, resume=str(ckpt))
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), k


def test_extra_modules_are_trained_checkpointed_and_not_exported(digits_small, make_args, tmp_path, toy_method):
    train, _ = digits_small
    trainer = _run(make_args, train, toy_method, tmp_path / "run", max_steps=4)
    extra = trainer.extra_modules["scale"].weight
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(extra) in opt_params
    from safetensors.torch import load_file

    ckpt = load_file(str(tmp_path / "run" / "checkpoint-4" / "distill_modules.safetensors"))
    assert torch.equal(ckpt["scale.weight"], extra.detach())
    assert not torch.equal(ckpt["scale.weight"], torch.nn.Linear(10, 10).weight)  # it was trained
    trainer.save_model(str(tmp_path / "export"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert not any("scale" in k for k in exported)
    assert not (tmp_path / "export" / "distill_modules.safetensors").exists()


def test_gradient_accumulation_matches_a_bigger_batch(digits_small, make_args):
    train, _ = digits_small
    results = []
    for bs, accum in ((16, 1), (8, 2)):
        args = make_args(per_device_train_batch_size=bs, gradient_accumulation_steps=accum, max_steps=2,
                         learning_rate=1e-2)
        student = PlainClassifier(seed=1)
        trainer = DistillationTrainer(model=student, teacher_model=PlainClassifier(seed=2), args=args,
                                      train_dataset=train)
        trainer.train()
        results.append(_params(student))
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-5), k


def test_supervised_method_needs_no_teacher_and_loads_none(digits_small, make_args):
    train, _ = digits_small
    trainer = DistillationTrainer(model=tiny_timm(), args=make_args(distill_method="supervised"), train_dataset=train)
    trainer.train()
    assert len(trainer.teachers) == 0
    assert "eval_teacher_accuracy" not in trainer.evaluate(train)


def test_mixed_precision_reaches_the_teacher_forward(digits_small, make_args):
    train, _ = digits_small
    teacher = PlainClassifier(seed=2)
    seen = []
    teacher.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = DistillationTrainer(model=PlainClassifier(seed=1), teacher_model=teacher,
                                  args=make_args(bf16=True, max_steps=1), train_dataset=train)
    trainer.train()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert next(teacher.parameters()).dtype == torch.float32  # CPU: weights stay fp32 under autocast
