import pytest
import torch
from conftest import tiny_hf_resnet, tiny_spec, tiny_timm

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images, with_image_transform
from hf_distill.losses import soft_kl

SPEC32 = tiny_spec(size=32)


@pytest.fixture(scope="module")
def data32(digits):
    return (with_image_transform(digits["train"].select(range(64)), SPEC32),
            with_image_transform(digits["test"].select(range(32)), SPEC32))


def _sftn(make_args, train, teacher=None, student="test_resnet", **kw):
    args = make_args(distill_method="sftn", sftn_student_model=student, **kw)
    return DistillationTrainer(model=teacher or tiny_timm("resnet18", seed=1, spec=SPEC32), args=args,
                               train_dataset=train, eval_dataset=train)


def test_branches_attach_after_each_teacher_stage_and_match_the_student(data32, make_args):
    train, _ = data32
    t = _sftn(make_args, train)
    assert t.args.temperature == 1.0
    assert t.method.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    assert list(t.extra_modules) == ["branch1", "branch2", "branch3"]
    out = t.model.eval()(pixel_values=torch.zeros(2, 1, 32, 32))
    assert [tuple(z.shape) for z in out["extra"]["branch_logits"]] == [(2, 10)] * 3


def test_loss_matches_hand_computation_and_gradients_reach_the_teacher(data32, make_args):
    train, _ = data32
    t = _sftn(make_args, train, sftn_lambda_teacher=0.5, sftn_lambda_kl=2.0, sftn_lambda_ce=0.7, temperature=2.0)
    batch = collate_images([train[i] for i in range(8)])
    t.model.eval()
    loss = t.compute_loss(t.model, batch)
    with torch.no_grad():
        out = t.model(pixel_values=batch["pixel_values"])
        y = batch["labels"]
        want = 0.5 * torch.nn.functional.cross_entropy(out["logits"], y)
        for z in out["extra"]["branch_logits"]:
            want += 2.0 * soft_kl(z, out["logits"], 2.0) + 0.7 * torch.nn.functional.cross_entropy(z, y)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # branch-only terms send gradients into the teacher's earlier stages
    t.model.train()
    t.model.zero_grad()
    out = t.model(pixel_values=batch["pixel_values"])
    z_r = out["extra"]["branch_logits"][0]
    torch.nn.functional.cross_entropy(z_r, y).backward()
    teacher = t.student  # in SFTN the trained model is the teacher
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.layer1.parameters())
    assert all(p.grad is None for p in teacher.layer4.parameters())  # beyond the branch point
    branch = t.extra_modules["branch1"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.transform.parameters())
    # the copy's stages before the branch point are frozen (never run)
    assert all(not p.requires_grad for p in branch.student.model.layer1.parameters())


def test_saved_teacher_has_no_branch_weights_reloads_identically_and_card_says_sftn(data32, make_args, tmp_path):
    import timm
    from safetensors.torch import load_file

    train, _ = data32
    t = _sftn(make_args, train, max_steps=2)
    t.train()
    metrics = t.evaluate()
    assert {"eval_branch1_accuracy", "eval_branch3_accuracy"} <= set(metrics)
    out = tmp_path / "teacher"
    t.save_model(str(out))
    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(t.student.state_dict()) and not any("branch" in k for k in keys)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(reloaded(x), t.student.eval()(x))
    card = (out / "README.md").read_text()
    assert "SFTN teacher" in card and "test_resnet" in card


def test_sftn_teacher_then_any_method_and_another_student(data32, make_args, tmp_path):
    """The saved SFTN teacher is an ordinary teacher: KD and FitNets students (of the architecture it was made
    for, and of another one) train from it, and their losses use its logits and features."""
    from hf_distill import load_model
    from hf_distill.models import set_input_spec

    train, _ = data32
    t = _sftn(make_args, train, max_steps=2)
    t.train()
    t.save_model(str(tmp_path / "teacher"))
    teacher = load_model(str(tmp_path / "teacher"))
    set_input_spec(teacher, SPEC32)
    batch = collate_images([train[i] for i in range(8)])
    students = [("kd", {}, tiny_timm(seed=3, spec=SPEC32)),
                ("fitnets", {"hint_layers": ["layer2:layer2"], "hint_weight": 1.0}, tiny_timm(seed=3, spec=SPEC32)),
                ("kd", {}, tiny_hf_resnet(seed=4, spec=SPEC32))]  # not the sftn_student_model architecture
    for method, kw, student in students:
        before = {k: v.clone() for k, v in student.state_dict().items()}
        d = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                                args=make_args(distill_method=method, max_steps=2, logging_steps=1, **kw))
        with torch.no_grad():  # the teacher the student learns from is the saved SFTN teacher
            assert torch.equal(d.teacher_logits(batch["pixel_values"]), t.student.eval()(batch["pixel_values"]))
        d.train()
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if v.is_floating_point())
        terms = set().union(*(h for h in d.state.log_history if "loss" in h))
        assert ({"loss_kd", "loss_hint"} if method == "fitnets" else {"loss_kd", "loss_ce"}) <= terms


def test_heterogeneous_pairs(data32, make_args, tmp_path):
    from transformers import ResNetConfig

    train, _ = data32
    # timm ResNet teacher, MobileNetV3 student (6 block groups regrouped to the teacher's 4 stages)
    t = _sftn(make_args, train, student="mobilenetv3_small_050")
    out = t.model.eval()(pixel_values=torch.zeros(2, 1, 32, 32))
    assert len(out["extra"]["branch_logits"]) == 3
    # timm CNN teacher, ViT student: tokens built from the teacher's maps (class token learned)
    ViT = "vit_tiny_patch16_224"
    t = _sftn(make_args, train, student=ViT)
    assert t.method.student_arch.patch_embed is not None
    out = t.model.eval()(pixel_values=torch.zeros(2, 1, 32, 32))
    assert [tuple(z.shape) for z in out["extra"]["branch_logits"]] == [(2, 10)] * 3
    # transformers teacher with a timm student
    folder = tmp_path / "hf_student"
    ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1], num_labels=10
                 ).save_pretrained(folder)
    t = _sftn(make_args, train, teacher=tiny_timm("resnet18", seed=1, spec=SPEC32), student=str(folder))
    assert len(t.extra_modules) == 2  # 3 student stages -> teacher regrouped to 3


def test_sftn_needs_a_student(make_args):
    with pytest.raises(ValueError, match="sftn_student_model"):
        make_args(distill_method="sftn")
