import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_hf_resnet, tiny_spec, tiny_timm
from torch import nn

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images, with_image_transform
from hf_distill.models.exits import MultiExitModel
from hf_distill.losses import soft_kl

SPEC32 = tiny_spec(size=32)


@pytest.fixture(scope="module")
def data32(digits):
    return (with_image_transform(digits["train"].select(range(96)), SPEC32),
            with_image_transform(digits["test"].select(range(48)), SPEC32))


def _byot(make_args, train, student=None, **kw):
    args = make_args(distill_method="byot", **kw)
    return DistillationTrainer(model=student or tiny_timm(seed=1, spec=SPEC32), args=args, train_dataset=train,
                               eval_dataset=train)


def test_defaults_and_exits_follow_the_stages(data32, make_args):
    train, _ = data32
    t = _byot(make_args, train)
    assert t.args.temperature == 3.0 and t.args.byot_alpha == 0.3 and t.args.byot_feature_weight == 0.03
    assert t.method.exit_layers == ["layer1", "layer2", "layer3"] and t.method.deepest_layer == "layer4"
    assert list(t.extra_modules) == ["exit1", "exit2", "exit3"]


def test_loss_matches_hand_computation(data32, make_args):
    train, _ = data32
    t = _byot(make_args, train)
    batch = collate_images([train[i] for i in range(8)])
    t.model.eval()
    loss = t.compute_loss(t.model, batch)
    student, y = t.student, batch["labels"]
    with torch.no_grad():
        x = batch["pixel_values"]
        h = student.maxpool(student.act1(student.bn1(student.conv1(x))))
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(student, name)(h)
            feats.append(h)
        z_k = student.forward_head(h)
        want = F.cross_entropy(z_k, y)
        for i in range(3):
            head = t.extra_modules[f"exit{i + 1}"]
            f_i = head.features(feats[i])
            z_i = head.classify(f_i)
            kl = soft_kl(z_i, z_k, 3.0)
            feat = ((f_i - feats[3]) ** 2).flatten(1).sum(1).mean()
            want = want + 0.7 * F.cross_entropy(z_i, y) + 0.3 * kl + 0.03 * feat
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_gradients_reach_exits_and_backbone_and_targets_are_detached(data32, make_args):
    train, _ = data32
    t = _byot(make_args, train)
    batch = collate_images([train[i] for i in range(8)])
    t.model.train()
    out = t.model(pixel_values=batch["pixel_values"])
    from hf_distill.methods import StepOutputs

    loss, _ = t.method.loss(StepOutputs(student_logits=out["logits"], labels=batch["labels"],
                                        extra_outputs=out["extra"]))
    loss.backward()
    for name, p in t.extra_modules.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert next(t.student.conv1.parameters()).grad.abs().sum() > 0
    # deepest targets are detached: exit-only terms send nothing into layer4 or the head
    t.model.zero_grad()
    out = t.model(pixel_values=batch["pixel_values"])
    z1, f1 = out["extra"]["exit_logits"][0], out["extra"]["exit_features"][0]
    (soft_kl(z1, out["logits"].detach(), 3.0) + ((f1 - out["extra"]["deepest_feature"].detach()) ** 2).sum()
     ).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in t.student.layer4.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.student.layer1.parameters())


def test_feature_mean_reduction_averages_over_features(data32, make_args):
    train, _ = data32
    batch = collate_images([train[i] for i in range(8)])
    terms = {}
    for reduction in ("sum", "mean"):
        t = _byot(make_args, train, byot_feature_reduction=reduction)
        t.model.train()  # terms are logged in training; batch-stat BN gives the same output twice
        with torch.no_grad():
            out = t.model(pixel_values=batch["pixel_values"])
        t.compute_loss(t.model, batch)
        terms[reduction] = t.last_loss_terms["loss_feature_exit1"].item()
        f1, fk = out["extra"]["exit_features"][0], out["extra"]["deepest_feature"]
        want = ((f1 - fk) ** 2).mean() if reduction == "mean" else ((f1 - fk) ** 2).flatten(1).sum(1).mean()
        assert terms[reduction] == pytest.approx(want.item(), rel=1e-5)
    numel = fk[0].numel()
    assert terms["sum"] == pytest.approx(terms["mean"] * numel, rel=1e-4)


@pytest.mark.parametrize("bottleneck", ["sepconv", "conv"])
def test_exit_bottleneck_reaches_the_deepest_shape(bottleneck):
    from hf_distill.models.exits import ExitHead, ExitSpec

    # a 64-channel 16x16 stage facing a 256-channel 2x2 deepest feature: 3 halvings
    head = ExitHead(ExitSpec("layer1", (2, 64, 16, 16), "nchw", (2, 256, 2, 2), "nchw", 10, 0, bottleneck))
    z, f = head(torch.randn(2, 64, 16, 16))
    assert z.shape == (2, 10) and f.shape == (2, 256, 2, 2)
    convs = [m for m in head.bottleneck if isinstance(m, nn.Conv2d)]
    strided = [m for m in convs if m.stride == (2, 2)]
    assert len(strided) == 3
    if bottleneck == "sepconv":  # depthwise 3x3 stride 2 then pointwise, doubling channels
        assert all(m.groups == m.in_channels for m in strided)
        assert [m.out_channels for m in convs if m.kernel_size == (1, 1)] == [128, 256, 256]
    assert isinstance(head.bottleneck[-1], nn.BatchNorm2d)  # no ReLU at the end: F_K may be negative


def test_sepconv_exits_are_much_lighter_than_conv_exits(data32, make_args):
    train, _ = data32
    n = {b: sum(p.numel() for p in _byot(make_args, train, byot_exit_bottleneck=b).extra_modules.parameters())
         for b in ("sepconv", "conv")}
    assert n["sepconv"] * 3 < n["conv"]


def test_bad_bottleneck_or_reduction_is_refused(make_args):
    with pytest.raises(ValueError, match="byot_exit_bottleneck"):
        make_args(distill_method="byot", byot_exit_bottleneck="dense")
    with pytest.raises(ValueError, match="byot_feature_reduction"):
        make_args(distill_method="byot", byot_feature_reduction="max")


def test_exit_shapes_for_cnn_and_vit_students(data32, make_args):
    import timm
    from transformers import AutoModelForImageClassification, ViTConfig

    from hf_distill.models import set_input_spec

    train, _ = data32
    cnn = _byot(make_args, train)
    x = torch.zeros(2, 1, 32, 32)
    out = cnn.model.eval()(pixel_values=x)
    assert [tuple(z.shape) for z in out["extra"]["exit_logits"]] == [(2, 10)] * 3
    assert all(f.shape == out["extra"]["deepest_feature"].shape for f in out["extra"]["exit_features"])

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                            num_classes=10, in_chans=1)
    set_input_spec(vit, SPEC32)
    t = _byot(make_args, train, student=vit)
    out = t.model.eval()(pixel_values=x)
    assert [tuple(z.shape) for z in out["extra"]["exit_logits"]] == [(2, 10)] * 3
    assert tuple(out["extra"]["deepest_feature"].shape) == (2, 17, 192)  # cls + 4x4 patches
    assert t.extra_modules["exit1"].tokens

    hf_vit = AutoModelForImageClassification.from_config(ViTConfig(
        image_size=32, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, num_labels=10))
    set_input_spec(hf_vit, SPEC32)
    t = _byot(make_args, train, student=hf_vit)
    out = t.model.eval()(pixel_values=x)
    assert [tuple(z.shape) for z in out["extra"]["exit_logits"]] == [(2, 10)] * 3


def test_training_logs_every_term_and_eval_reports_each_exit(data32, make_args):
    train, evaluation = data32
    t = _byot(make_args, train, max_steps=3, logging_steps=1)
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert {"loss_ce_deepest", "loss_ce_exit1", "loss_kd_exit3", "loss_feature_exit2"} <= set(logs[-1])
    metrics = t.evaluate(evaluation)
    for key in ("eval_accuracy", "eval_exit1_accuracy", "eval_exit2_accuracy", "eval_exit3_accuracy",
                "eval_ensemble_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_plain_export_has_no_exit_weights_and_reloads_identically(data32, make_args, tmp_path):
    import timm
    from safetensors.torch import load_file

    train, _ = data32
    t = _byot(make_args, train, max_steps=2)
    t.train()
    t.save_model(str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "exits.safetensors").exists()
    keys = set(load_file(str(tmp_path / "plain" / "model.safetensors")))
    assert keys == set(t.student.state_dict()) and not any("exit" in k for k in keys)
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True).eval()
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(reloaded(x), t.student.eval()(x))


def test_export_with_exits_reloads_for_early_exit_and_ensemble(data32, make_args, tmp_path):
    train, _ = data32
    t = _byot(make_args, train, max_steps=2, byot_export_exits=True)
    t.train()
    t.save_model(str(tmp_path / "multi"))
    assert {"exits.safetensors", "exits_config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "multi"))
    m = MultiExitModel.from_pretrained(str(tmp_path / "multi"))
    x = torch.randn(4, 1, 32, 32)
    student = t.student.eval()
    assert torch.equal(m(x), student(x))
    out = t.model.eval()(pixel_values=x)
    ens = torch.stack([z.softmax(-1) for z in [*out["extra"]["exit_logits"], out["logits"]]]).mean(0)
    assert torch.allclose(m(x, mode="ensemble").exp(), ens, atol=1e-5)
    logits, used = m(x, early_exit_threshold=0.0)  # everything leaves at the first exit
    assert used.tolist() == [0] * 4 and torch.allclose(logits, out["extra"]["exit_logits"][0], atol=1e-5)
    logits, used = m(x, early_exit_threshold=1.01)  # nothing is confident enough: deepest
    assert used.tolist() == [3] * 4 and torch.allclose(logits, student(x), atol=1e-5)


def test_exits_saved_without_a_bottleneck_field_reload_as_conv(data32, make_args, tmp_path):
    import json

    train, _ = data32
    t = _byot(make_args, train, max_steps=1, byot_export_exits=True, byot_exit_bottleneck="conv")
    t.train()
    t.save_model(str(tmp_path / "old"))
    config_path = tmp_path / "old" / "exits_config.json"
    config = json.loads(config_path.read_text())
    for e in config["exits"]:
        assert e.pop("bottleneck") == "conv"  # as written before the field existed
    config_path.write_text(json.dumps(config))
    m = MultiExitModel.from_pretrained(str(tmp_path / "old"))
    x = torch.randn(3, 1, 32, 32)
    out = t.model.eval()(pixel_values=x)
    assert torch.allclose(m(x, early_exit_threshold=0.0)[0], out["extra"]["exit_logits"][0], atol=1e-5)


class _Counting(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale, self.batch_sizes = scale, []

    def forward(self, h):
        self.batch_sizes.append(h.shape[0])
        return h * self.scale


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Identity()
        self.s0, self.s1, self.s2 = _Counting(1.0), _Counting(10.0), _Counting(1.0)
        self.head = nn.Identity()

    def forward(self, x):
        return self.head(self.s2(self.s1(self.s0(self.stem(x)))))


class _ExitAsIs(nn.Module):
    def forward(self, h):
        return h, h


def test_early_exit_picks_the_right_exit_and_stops_computing():
    from hf_distill.models.stages import split_model

    toy = _Toy()
    staged = split_model(toy, stage_names=["s0", "s1", "s2"], stem=["stem"], head=["head"])
    m = MultiExitModel(toy, nn.ModuleList([_ExitAsIs(), _ExitAsIs()]), ["s0", "s1", "s2"], staged=staged)
    x = torch.zeros(4, 5)
    x[0, 3] = 10.0   # confident at exit 1 (softmax max ~ 1)
    x[1, 1] = 1.0    # weak at exit 1, x10 after s1 -> confident at exit 2
    x[2, 2] = 0.1    # x10 -> 1.0: never confident -> deepest
    logits, used = m(x, early_exit_threshold=0.9)
    assert used.tolist() == [0, 1, 2, 2]
    assert logits.argmax(-1).tolist()[:2] == [3, 1]
    assert toy.s0.batch_sizes == [4] and toy.s1.batch_sizes == [3] and toy.s2.batch_sizes == [2]


def test_byot_composes_with_an_external_teacher(data32, make_args):
    train, _ = data32
    t = DistillationTrainer(model=tiny_timm(seed=1, spec=SPEC32), teacher_model=tiny_hf_resnet(seed=2, spec=SPEC32),
                            args=make_args(distill_method="byot", logging_steps=1, max_steps=2), train_dataset=train)
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert "loss_kd_deepest" in logs[-1] and "loss_ce_exit1" in logs[-1]


def test_byot_composes_with_fitnets_hints(data32, make_args):
    from hf_distill.losses import hint_loss

    train, _ = data32
    teacher = tiny_hf_resnet(seed=2, spec=SPEC32)
    t = DistillationTrainer(model=tiny_timm(seed=1, spec=SPEC32), teacher_model=teacher, train_dataset=train,
                            args=make_args(distill_method="byot", hint_layers=["layer2:resnet.encoder.stages.1"],
                                           hint_weight=0.5, byot_exits="auto", logging_steps=1, max_steps=2))
    assert t.method.exit_layers == ["layer1", "layer2", "layer3"]
    assert set(t.extra_modules) == {"exit1", "exit2", "exit3", "hint0"}
    batch = collate_images([train[i] for i in range(8)])
    t.model.train()
    loss = t.compute_loss(t.model, batch)
    out = t.model(pixel_values=batch["pixel_values"])
    with torch.no_grad():
        hidden = teacher(pixel_values=t.teachers.adapters[0](batch["pixel_values"]), output_hidden_states=True)
    want_hint = hint_loss(out["extra"]["hints"]["regressed"][0], hidden.hidden_states[2])
    assert t.last_loss_terms["loss_hint"].item() == pytest.approx(want_hint.item(), rel=1e-5)
    # the hint is the only difference from BYOT + KD: remove it and the loss drops by hint_weight * hint
    t.method.hints, hints = None, t.method.hints
    without = t.compute_loss(t.model, batch).item()  # train-mode BN: the same batch gives the same forward
    t.method.hints = hints
    assert loss.item() - 0.5 * want_hint.item() == pytest.approx(without, rel=1e-5)
    loss.backward()
    assert t.extra_modules["hint0"].proj[0].weight.grad.abs().sum() > 0  # the regressor is trained
    t.train()
    assert "loss_hint" in [h for h in t.state.log_history if "loss" in h][-1]


def test_byot_hints_need_a_weight_a_teacher_and_no_stage1(data32, make_args):
    train, _ = data32
    with pytest.raises(ValueError, match="hint_weight"):
        make_args(distill_method="byot", hint_layers=["layer2:layer2"])
    with pytest.raises(ValueError, match="hint_epochs"):
        make_args(distill_method="byot", hint_layers=["layer2:layer2"], hint_weight=1.0, hint_epochs=1.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        _byot(make_args, train, hint_layers=["layer2:layer2"], hint_weight=1.0)
