"""Label-free feature distillation: feature extraction per teacher family, grids, adaptors, standardisation,
losses by hand, k-NN, no labels anywhere, export and reload, resume."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_spec

from hf_distill import DistillationTrainer, set_input_spec
from hf_distill.data import collate_images, with_image_transform
from hf_distill.models.features import (
    FeatureStudent,
    RunningStandardizer,
    backbone_features,
    knn_accuracy,
    set_feature_layer,
    spatial_loss,
    summary_loss,
)

SPEC = tiny_spec(size=32)
X = torch.randn(2, 3, 32, 32)


def _hf(kind):
    import transformers as tr

    common = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32)
    torch.manual_seed(0)
    return {
        "dinov2": lambda: tr.Dinov2Model(tr.Dinov2Config(**common)),
        "dinov2_registers": lambda: tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**common,
                                                                                           num_register_tokens=4)),
        "clip": lambda: tr.CLIPVisionModel(tr.CLIPVisionConfig(**common)),
        "clip_projection": lambda: tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(**common, projection_dim=24)),
        "siglip": lambda: tr.SiglipVisionModel(tr.SiglipVisionConfig(**common)),
        "vit": lambda: tr.ViTModel(tr.ViTConfig(**common)),
        "vit_classifier": lambda: tr.ViTForImageClassification(tr.ViTConfig(**common, num_labels=5)),
    }[kind]().eval()


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "clip", "clip_projection", "siglip", "vit",
                                  "vit_classifier"])
def test_transformers_teachers_summary_and_patch_grid(kind):
    model = _hf(kind)
    with torch.no_grad():
        summary, spatial = backbone_features(model, X)
        tower = model.vit if kind == "vit_classifier" else model.vision_model if kind == "clip_projection" else model
        kw = {"interpolate_pos_encoding": True} if kind in ("clip", "clip_projection", "siglip") else {}
        out = tower(pixel_values=X, **kw)
        tokens = out.last_hidden_state
        prefix = {"dinov2_registers": 5, "siglip": 0}.get(kind, 1)  # class (+ register) tokens dropped
        if kind.startswith("clip"):
            tokens = tower.post_layernorm(tokens)
        want_map = tokens[:, prefix:].transpose(1, 2).reshape(2, 32, 8, 8)
        if kind == "clip_projection":
            want_summary = model(pixel_values=X, interpolate_pos_encoding=True).image_embeds
        elif kind.startswith("vit"):
            want_summary = tokens[:, 0]  # the normed class token (ViT's tanh pooler is not the embedding)
        else:
            want_summary = out.pooler_output
    assert spatial.shape == (2, 32, 8, 8) and torch.allclose(spatial, want_map, atol=1e-6)
    assert torch.allclose(summary, want_summary, atol=1e-6)


@pytest.mark.parametrize("name,kw,prefix", [
    ("vit_tiny_patch16_224", {}, 1),
    ("vit_small_patch14_reg4_dinov2", {}, 5),
    ("deit_tiny_distilled_patch16_224", {"num_classes": 10}, 2),
])
def test_timm_vits_drop_every_prefix_token(name, kw, prefix):
    model = timm.create_model(name, img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                              **{"num_classes": 0, **kw}).eval()
    assert model.num_prefix_tokens == prefix
    with torch.no_grad():
        summary, spatial = backbone_features(model, X)
        tokens = model.forward_features(X)
    assert spatial.shape == (2, 32, 8, 8)
    assert torch.equal(spatial, tokens[:, prefix:].transpose(1, 2).reshape(2, 32, 8, 8))
    assert summary.shape == (2, 32)


def test_timm_cnn_map_nhwc_map_and_a_declared_layer():
    cnn = timm.create_model("resnet18", num_classes=0).eval()
    with torch.no_grad():
        summary, spatial = backbone_features(cnn, torch.randn(2, 3, 64, 64))
    assert spatial.shape == (2, 512, 2, 2) and torch.allclose(summary, spatial.mean(dim=(2, 3)), atol=1e-6)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=16, depths=(1, 1),
                             num_heads=(1, 2), num_classes=0).eval()
    with torch.no_grad():
        _, spatial = backbone_features(swin, X)
        nhwc = swin.forward_features(X)
    assert nhwc.shape[-1] == spatial.shape[1] and torch.equal(spatial, nhwc.permute(0, 3, 1, 2))

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=(2, 3)))

    plain = Plain()
    from hf_distill.models.features import FeatureExtractionError

    with pytest.raises(FeatureExtractionError, match="set_feature_layer"):
        backbone_features(plain, X)
    set_feature_layer(plain, "body")
    summary, spatial = backbone_features(plain, X)
    assert spatial.shape == (2, 6, 32, 32) and torch.allclose(summary, plain.body(X).mean(dim=(2, 3)))


def test_spatial_loss_aligns_a_cnn_grid_to_a_vit_grid_and_matches_by_hand():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 8, 8)  # a 4x4 map facing an 8x8 patch grid
    up = F.interpolate(student, size=(8, 8), mode="bilinear", align_corners=False)
    cos = 1 - F.cosine_similarity(up, teacher, dim=1)
    want = 0.9 * cos.mean() + 0.1 * F.smooth_l1_loss(up, teacher)
    assert spatial_loss(student, teacher).item() == pytest.approx(want.item(), rel=1e-6)
    big = torch.randn(2, 8, 16, 16)  # and a larger student map is pooled down
    want = 0.9 * (1 - F.cosine_similarity(F.adaptive_avg_pool2d(big, 8), teacher, dim=1)).mean() + \
        0.1 * F.smooth_l1_loss(F.adaptive_avg_pool2d(big, 8), teacher)
    assert spatial_loss(big, teacher).item() == pytest.approx(want.item(), rel=1e-6)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert summary_loss(a, b).item() == pytest.approx((1 - F.cosine_similarity(a, b)).mean().item(), rel=1e-6)


def test_standardisation_gives_unit_variance_after_warmup_and_then_stays_fixed():
    torch.manual_seed(0)
    scale, shift = torch.tensor([1.0, 10.0, 0.1]), torch.tensor([5.0, -3.0, 0.0])
    stats = RunningStandardizer(3, warmup=4)
    batches = [torch.randn(64, 3) * scale + shift for _ in range(4)]
    for b in batches:
        stats.update(b)
    z = stats.standardize(torch.cat(batches))
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-4) and torch.allclose(z.std(0), torch.ones(3), atol=1e-2)
    frozen = stats.mean.clone()
    stats.update(torch.randn(64, 3) * 100)
    assert torch.equal(stats.mean, frozen) and int(stats.count) == 4


def test_knn_accuracy_against_brute_force():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 16)), rng.normal(size=(50, 16))
    ytrain, ytest = rng.integers(0, 4, 200), rng.integers(0, 4, 50)
    train[:, 0] += ytrain * 2
    test[:, 0] += ytest * 2
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    sn = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for i in range(50):
        sims = tn @ sn[i]
        top = np.argsort(-sims)[:20]
        votes = np.zeros(4)
        for j in top:
            votes[ytrain[j]] += np.exp(sims[j] / 0.07)
        correct += votes.argmax() == ytest[i]
    got = knn_accuracy(torch.tensor(train), torch.tensor(ytrain), torch.tensor(test), torch.tensor(ytest), chunk=7)
    assert got == pytest.approx(correct / 50)


# --- through the trainer ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unlabelled(digits):
    return with_image_transform(digits["train"].select(range(64)).remove_columns("label"), SPEC)


def _student(seed=1):
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=0, in_chans=1)
    set_input_spec(model, SPEC)
    return model


def _vit_teacher(seed=2):
    import transformers as tr

    torch.manual_seed(seed)
    model = tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_channels=1, num_register_tokens=2))
    set_input_spec(model, SPEC)
    return model


def _cnn_teacher(seed=3):
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=0, in_chans=1)
    set_input_spec(model, SPEC)
    return model


def _trainer(make_args, train, teachers, **kw):
    args = make_args(distill_method="feature", per_device_train_batch_size=16, **kw)
    return DistillationTrainer(model=_student(), teacher_model=teachers, args=args, train_dataset=train)


def test_loss_by_hand_with_two_teachers_and_terms_logged(unlabelled, make_args):
    t = _trainer(make_args, unlabelled, [_vit_teacher(), _cnn_teacher()], feature_teacher_weights=[1.0, 0.5],
                 feature_standardize_batches=0, logging_steps=1, max_steps=2)
    assert t.method.keys == ["dinov2withregistersmodel", "resnet18"]
    assert {k: tuple(m.net[-1].weight.shape) for k, m in t.extra_modules.items()} == {
        "dinov2withregistersmodel/summary": (32, 2048), "dinov2withregistersmodel/spatial": (32, 2048),
        "resnet18/summary": (512, 2048), "resnet18/spatial": (512, 2048)}  # student width 512 x 4 hidden
    batch = collate_images([unlabelled[i] for i in range(8)])
    t.model.eval()
    loss = t.compute_loss(t.model, batch)
    x = batch["pixel_values"]
    with torch.no_grad():
        s_sum, s_map = backbone_features(t.student, x)
        want = 0.0
        for key, teacher, w in (("dinov2withregistersmodel", t.teachers.models[0], 1.0),
                                ("resnet18", t.teachers.models[1], 0.5)):
            t_sum, t_map = backbone_features(teacher, x)
            want += w * (summary_loss(t.extra_modules[f"{key}/summary"](s_sum), t_sum)
                         + spatial_loss(t.extra_modules[f"{key}/spatial"](s_map), t_map))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    t.train()
    logged = set().union(*(h for h in t.state.log_history if "loss" in h))
    assert {"loss_summary_resnet18", "loss_spatial_resnet18", "loss_summary_dinov2withregistersmodel",
            "loss_spatial_dinov2withregistersmodel"} <= logged


def test_trains_without_labels_gradients_reach_student_and_adaptors_only(unlabelled, make_args):
    t = _trainer(make_args, unlabelled, _cnn_teacher(), feature_targets=["summary"], max_steps=1)
    teacher = t.teachers.models[0]
    t.model.train()
    t.model.zero_grad()
    t.compute_loss(t.model, collate_images([unlabelled[i] for i in range(8)])).backward()
    assert all(p.grad is not None for p in t.extra_modules.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert list(t.extra_modules) == ["resnet18/summary", "resnet18/summary_stats"]
    t.train()


def test_evaluation_reports_cosine_and_knn_of_student_and_teacher(digits, unlabelled, make_args):
    ev = with_image_transform(digits["test"].select(range(40)), SPEC)
    memory = with_image_transform(digits["train"].select(range(100, 260)), SPEC)
    teacher = _cnn_teacher()
    t = DistillationTrainer(model=_student(), teacher_model=teacher, train_dataset=unlabelled, eval_dataset=ev,
                            knn_train_dataset=memory, args=make_args(distill_method="feature"))
    m = t.evaluate()
    assert {"eval_feature_cosine", "eval_feature_cosine_summary_resnet18", "eval_feature_cosine_spatial_resnet18",
            "eval_knn_accuracy", "eval_teacher_knn_accuracy"} <= set(m)
    full, mem = collate_images([ev[i] for i in range(40)]), collate_images([memory[i] for i in range(160)])
    with torch.no_grad():
        want = knn_accuracy(backbone_features(teacher, mem["pixel_values"])[0], mem["labels"],
                            backbone_features(teacher, full["pixel_values"])[0], full["labels"])
        student = t.student.eval()
        want_student = knn_accuracy(backbone_features(student, mem["pixel_values"])[0], mem["labels"],
                                    backbone_features(student, full["pixel_values"])[0], full["labels"])
    assert m["eval_teacher_knn_accuracy"] == pytest.approx(want) and m["eval_knn_accuracy"] == pytest.approx(
        want_student)


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_export_reloads_the_backbone_to_identical_features_and_adaptors_only_when_asked(library, unlabelled,
                                                                                       make_args, tmp_path):
    from hf_distill import load_model

    if library == "timm":
        student = timm.create_model("resnet10t", num_classes=10, in_chans=1)  # a classifier: its head is ignored
        set_input_spec(student, SPEC)
    else:
        import transformers as tr

        student = tr.ViTForImageClassification(tr.ViTConfig(image_size=32, patch_size=4, hidden_size=32,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            intermediate_size=32, num_channels=1, num_labels=3))
        set_input_spec(student, SPEC)
    for export in (False, True):
        out = tmp_path / f"out{export}"
        t = DistillationTrainer(model=student, teacher_model=_cnn_teacher(), train_dataset=unlabelled,
                                args=make_args(distill_method="feature", max_steps=2, output_dir=str(out),
                                               feature_export_adaptors=export))
        t.train()
        t.save_model()
        files = set(p.name for p in out.iterdir())
        assert ("feature_adaptors.safetensors" in files) == export
        reloaded = load_model(str(out), backbone=True).eval()
        if library == "timm":
            assert reloaded.num_classes == 0
        else:
            assert type(reloaded).__name__ == "ViTModel"
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            want = backbone_features(t.student.eval(), x)
            got = backbone_features(reloaded, x)
        assert torch.allclose(want[0], got[0], atol=1e-6) and torch.allclose(want[1], got[1], atol=1e-6)
        if export:  # the documented loader: features in the teacher's own space
            fs = FeatureStudent.from_pretrained(out)
            with torch.no_grad():
                pred = fs(x, teacher="resnet18")
                stats = t.extra_modules["resnet18/summary_stats"]
                pred_std = F.normalize(t.extra_modules["resnet18/summary"](want[0]), dim=-1) * 512 ** 0.5
                raw = pred_std * stats.std + stats.mean  # the cosine-learned summary at sqrt(D) length
            assert torch.allclose(pred["summary"], raw, atol=1e-5)
            assert pred["spatial"].shape[1] == 512
        card = (out / "README.md").read_text()
        assert "image-feature-extraction" in card and "resnet18" in card


def test_resume_equals_uninterrupted_with_the_standardisation_in_the_checkpoint(unlabelled, make_args, tmp_path):
    def run(out, stop=None, resume=None):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if stop and state.global_step == stop:
                    control.should_training_stop = True

        t = _trainer(make_args, unlabelled, _cnn_teacher(), max_steps=6, save_strategy="steps", save_steps=2,
                     output_dir=str(out), feature_standardize_batches=3, lr_scheduler_type="constant")
        t.add_callback(Stop())
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop=2)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    assert int(resumed.extra_modules["resnet18/summary_stats"].count) == 3


def test_refusals(digits, unlabelled, make_args, tmp_path):
    from conftest import tiny_timm

    from hf_distill.teacher_cache import build_teacher_cache

    with pytest.raises(ValueError, match="does not use alpha"):
        make_args(distill_method="feature", alpha=0.5)
    with pytest.raises(ValueError, match="feature_targets"):
        make_args(distill_method="feature", feature_targets=["logits"])
    raw = digits["train"].select(range(16))
    build_teacher_cache(tiny_timm(seed=2), raw, tiny_spec(), tmp_path / "c", batch_size=16)
    with pytest.raises(ValueError, match="holds the teachers' logits, but distill_method='feature' learns their"):
        DistillationTrainer(model=_student(), args=make_args(distill_method="feature",
                                                             teacher_cache_dir=str(tmp_path / "c")))
