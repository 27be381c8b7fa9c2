"""Regression tests for issue 24: capabilities that broke where they met (one test per combination)."""

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_spec, tiny_timm

from hf_distill import DistillationTrainer, set_input_spec
from hf_distill.data import collate_images, with_image_transform

SPEC = tiny_spec(size=16)


@pytest.fixture(scope="module")
def unlabelled(digits):
    return with_image_transform(digits["train"].select(range(48)).remove_columns("label"), SPEC)


def _classifier_student(seed=1):
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)  # a classifier, trained on features
    set_input_spec(model, SPEC)
    return model


def _cnn_teacher(seed=3):
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=0, in_chans=1)
    set_input_spec(model, SPEC)
    return model


class _Stop:
    def __new__(cls, at):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if at and state.global_step == at:
                    control.should_training_stop = True

        return Stop()


# --- 1: checkpoints hold what resumes training, save_model() exports what the user ships ----------------------
def test_feature_distillation_of_a_classifier_resumes_and_loads_its_best_checkpoint(unlabelled, make_args, tmp_path):
    from hf_distill import load_model

    def run(out, stop=None, resume=None, **kw):
        args = make_args(distill_method="feature", max_steps=4, save_strategy="steps", save_steps=2,
                         per_device_train_batch_size=8, per_device_eval_batch_size=48,
                         output_dir=str(out), feature_standardize_batches=0, lr_scheduler_type="constant", **kw)
        t = DistillationTrainer(model=_classifier_student(), teacher_model=_cnn_teacher(), args=args,
                                train_dataset=unlabelled, eval_dataset=unlabelled if kw else None)
        t.add_callback(_Stop(stop))
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop=2)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # the export is still the backbone alone
    resumed.save_model()
    assert load_model(str(tmp_path / "cut"), backbone=True).num_classes == 0

    best = run(tmp_path / "best", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
               metric_for_best_model="feature_cosine", greater_is_better=True)
    import safetensors.torch

    stored = safetensors.torch.load_file(f"{best.state.best_model_checkpoint}/model.safetensors")
    assert {k: v for k, v in best.student.state_dict().items() if "num_batches" not in k}.keys() <= stored.keys()
    for k, v in stored.items():
        assert torch.equal(best.student.state_dict()[k], v), k


# --- 5: a DeiT student without a label term: the class head learns the teacher too ---------------------------
def _timm_deit(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, patch_size=4,
                              embed_dim=16, depth=1, num_heads=2, num_classes=10, in_chans=1)
    set_input_spec(model, SPEC)
    return model


@pytest.mark.parametrize("method", ["function_matching", "dist"])
def test_deit_student_without_label_term_trains_both_heads_on_the_teacher(method, digits, make_args):
    from hf_distill.losses import dist_terms, kd_loss

    train = with_image_transform(digits["train"].select(range(16)), SPEC)
    student, teacher = _timm_deit(), tiny_timm(seed=2, spec=SPEC)
    kw = {"dist_ce_weight": 0.0} if method == "dist" else {}
    t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                            args=make_args(distill_method=method, mixup_alpha=0.0, **kw))
    batch = collate_images([train[i] for i in range(8)])
    t.model.train()
    t.model.zero_grad()
    loss = t.compute_loss(t.model, batch)
    loss.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    with torch.no_grad():  # by hand: the mean of the teacher term on each head
        cls, dist = t.model._heads(batch["pixel_values"])
        z_t = teacher(batch["pixel_values"])
        a = t.args
        if method == "dist":
            def one(z):
                inter, intra = dist_terms(z, z_t, a.temperature)
                return a.dist_weight * (a.dist_beta * inter + a.dist_gamma * intra)
        else:
            def one(z):
                return kd_loss(z, z_t, None, a.temperature, 1.0)[0]
        want = 0.5 * (one(cls) + one(dist))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
