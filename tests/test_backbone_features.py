"""Any backbone a feature student or teacher, any model a teacher at a size it takes, the input size asked for
reaching the model: prefix tokens counted from the model, grids from the real input (non-square too),
hierarchical maps, logits-less outputs, one-line refusals, and the standardiser / FeatureStudent regressions."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers as tr
from timm.models.mlp_mixer import _create_mixer

from hf_distill import DistillationTrainer, InputSpec, load_model, set_input_spec
from hf_distill.models.features import (
    FeatureAdaptor,
    FeatureStudent,
    RunningStandardizer,
    backbone_features,
    set_feature_layer,
)
from hf_distill.models import InputSizeError, call_model
from hf_distill.teachers import Teachers

RECT = torch.randn(2, 3, 32, 48)  # a non-square batch: 8x12 patches of 4, 4x6 of 8


def _hand_grid(tokens, prefix, h, w):
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                             embed_dim=32, depth=1, num_heads=2, **kw).eval()


def test_timm_vit_prefix_tokens_on_a_non_square_grid():
    model = _vit(dynamic_img_size=True)
    with torch.no_grad():
        summary, spatial = backbone_features(model, RECT)
        tokens = model.forward_features(RECT)
    assert torch.equal(spatial, _hand_grid(tokens, 1, 8, 12))
    assert torch.equal(summary, tokens[:, 0])


def test_timm_token_model_without_prefix_tokens_mlp_mixer():
    torch.manual_seed(0)
    model = _create_mixer("mixer_s16_224", pretrained=False, num_classes=0, img_size=(32, 48), patch_size=8,
                          embed_dim=32, num_blocks=1).eval()
    with torch.no_grad():
        summary, spatial = backbone_features(model, RECT)
        tokens = model.forward_features(RECT)
    assert torch.equal(spatial, _hand_grid(tokens, 0, 4, 6))  # 24 tokens, no class token: 4x6, not a square
    assert torch.allclose(summary, tokens.mean(1))


def test_timm_pooled_tokens_read_from_forward_intermediates_pit():
    torch.manual_seed(0)
    model = timm.create_model("pit_ti_224", pretrained=False, num_classes=0, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        summary, spatial = backbone_features(model, x)
        _, (want,) = model.forward_intermediates(x, indices=1, norm=True)
        want_summary = model.forward_head(model.forward_features(x), pre_logits=True)
    assert spatial.shape[-2:] == (2, 2) and torch.equal(spatial, want)  # forward_features gives the class token only
    assert torch.allclose(summary, want_summary)


def test_timm_hierarchical_swin_map():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=32,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, spatial = backbone_features(model, x)
        want = model.forward_features(x).permute(0, 3, 1, 2)
    assert torch.equal(spatial, want)


def _hf_deit():
    torch.manual_seed(0)
    return tr.DeiTModel(tr.DeiTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32)).eval()


def test_transformers_deit_drops_class_and_distillation_tokens_on_any_grid():
    # 24 #12: one prefix token was counted, not two
    model = _hf_deit()
    for x, (h, w) in ((torch.randn(2, 3, 32, 32), (8, 8)), (RECT, (8, 12))):
        with torch.no_grad():
            summary, spatial = backbone_features(model, x)
            tokens = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert torch.equal(spatial, _hand_grid(tokens, 2, h, w))
        assert torch.equal(summary, tokens[:, 0])


def test_transformers_hierarchical_swin_reads_its_reshaped_map():
    torch.manual_seed(0)
    model = tr.SwinModel(tr.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                       window_size=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        summary, spatial = backbone_features(model, x)
        out = model(pixel_values=x, output_hidden_states=True)
    assert torch.equal(spatial, out.reshaped_hidden_states[-1]) and spatial.shape == (2, 32, 4, 4)
    assert torch.equal(summary, out.pooler_output)


class _TokenNet(torch.nn.Module):
    """Neither library's: a stride-4 patch embedding whose tokens are the feature."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.tokens = torch.nn.Identity()

    def forward(self, x):
        return self.tokens(self.embed(x).flatten(2).transpose(1, 2)).mean(1)


def test_declared_feature_layer_tokens_on_the_real_non_square_grid():
    # 24 #13: 96 tokens were laid on a guessed 10x9 square-ish grid (a crash); 8x12 is the input's
    torch.manual_seed(0)
    model = _TokenNet().eval()
    set_feature_layer(model, "tokens")
    with torch.no_grad():
        _, spatial = backbone_features(model, RECT)
        want = model.embed(RECT)
    assert torch.equal(spatial, want)


def test_feature_distillation_deit_student_mixer_and_swin_teachers_trains_saves_and_reloads(make_args, tmp_path):
    spec = InputSpec(image_size=(32, 32))
    student = _hf_deit()
    torch.manual_seed(1)
    mixer = _create_mixer("mixer_s16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=24,
                          num_blocks=1)
    swin = tr.SwinModel(tr.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                      window_size=4))
    for model in (student, mixer, swin):
        set_input_spec(model, spec)
    data = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(8)]
    out = tmp_path / "student"
    trainer = DistillationTrainer(model=student, teacher_model=[mixer, swin], train_dataset=data,
                                  args=make_args(distill_method="feature", max_steps=2, per_device_train_batch_size=4,
                                                 output_dir=str(out)))
    widths = {k: (m.net[0].in_features, m.net[-1].out_features) for k, m in trainer.extra_modules.items()
              if "stats" not in k}
    assert widths == {"mixer-s16-224/summary": (32, 24), "mixer-s16-224/spatial": (32, 24),
                      "swinmodel/summary": (32, 32), "swinmodel/spatial": (32, 32)}
    trainer.train()
    trainer.save_model()
    reloaded = load_model(str(out), backbone=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = backbone_features(trainer.student.eval(), x), backbone_features(reloaded, x)
    assert want[1].shape == (2, 32, 8, 8) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, got))


def test_fixed_size_teacher_is_fed_its_own_size():
    # CLIP keeps its image size in vision_config: it was fed the student's size (and failed)
    torch.manual_seed(0)
    config = tr.CLIPConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32),
                           text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32), num_labels=3)
    teacher = tr.CLIPForImageClassification(config).eval()
    teachers = Teachers([teacher], InputSpec(image_size=(16, 16)))
    assert teachers.adapters[0].resize and teachers.adapters[0].target.image_size == (32, 32)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = teacher(pixel_values=F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)).logits
        (got,) = teachers(x)
    assert got.shape == (2, 3) and torch.equal(got, want)


class _NeedsLargeInputs(torch.nn.Module):
    """A teacher that declares no fixed size but needs at least 32 px (a pooling stack, patch divisibility)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[-1] < 32:
            raise RuntimeError("input too small")
        return self.head(self.net(x).mean((2, 3)))


def test_teacher_that_does_not_take_the_student_size_is_fed_its_own():
    teacher = _NeedsLargeInputs()
    set_input_spec(teacher, InputSpec(image_size=(32, 32)))
    teachers = Teachers([teacher], InputSpec(image_size=(16, 16)))
    assert teachers.adapters[0].resize and "does not take 16x16" in teachers.describe_inputs()[0]
    assert teachers(torch.randn(2, 3, 16, 16))[0].shape == (2, 3)
    other = _NeedsLargeInputs()
    set_input_spec(other, InputSpec(image_size=(32, 32)))
    assert not Teachers([other], InputSpec(image_size=(48, 48))).adapters[0].resize  # takes 48: fed as it comes


def test_logits_less_output_as_teacher_and_image_less_model_refused():
    torch.manual_seed(0)
    teacher = tr.PPLCNetForImageClassification(tr.PPLCNetConfig(num_labels=3)).eval()  # scores in last_hidden_state
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = teacher(pixel_values=x).last_hidden_state
        got = call_model(teacher, x)
    assert want.shape == (2, 3) and torch.equal(got, want)
    gpt = tr.ImageGPTForImageClassification(tr.ImageGPTConfig(n_layer=1, n_embd=16, n_head=2, n_positions=64,
                                                              num_labels=3))
    with pytest.raises(ValueError, match=r"takes no pixel values") as err:
        Teachers([gpt], InputSpec(image_size=(8, 8)))
    assert "\n" not in str(err.value)


def test_image_size_builds_fixed_size_timm_models_for_it():
    model = load_model("deit_tiny_patch16_224", num_labels=3, pretrained=False, image_size=32)
    assert tuple(model.patch_embed.img_size) == (32, 32)
    from hf_distill.models import input_spec

    assert input_spec(model).image_size == (32, 32)
    assert call_model(model.eval(), torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_image_size_too_small_is_refused_in_one_line_naming_the_smallest_size():
    from hf_distill.cli import _cli_message

    with pytest.raises(InputSizeError) as err:
        load_model("ghostnetv2_100", num_labels=3, pretrained=False, image_size=32)
    message = str(err.value)
    assert "\n" not in message and "image_size=48" in message
    assert "--image_size 48" in _cli_message(message)


def test_standardizer_keeps_the_variance_of_features_with_a_large_mean():
    # 24 #16: float32 E[x^2] - E[x]^2 at a mean of 1e4 has a resolution of ~8 in the variance
    rng = np.random.default_rng(0)
    data = rng.normal(1e4, [1.0, 0.01, 3.0], size=(6, 50, 3))
    stats = RunningStandardizer(3, warmup=6)
    for batch in data:
        stats.update(torch.tensor(batch, dtype=torch.float32))
    flat = data.reshape(-1, 3).astype(np.float32).astype(np.float64)
    assert np.allclose(stats.mean.numpy(), flat.mean(0), rtol=1e-7)
    assert np.allclose(stats.std.numpy(), flat.std(0), rtol=1e-3)


def test_feature_student_summary_does_not_depend_on_the_adaptor_scale():
    # 24 #14: a cosine-trained summary has no defined length; the export gave it the adaptor's
    torch.manual_seed(0)
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    stats = RunningStandardizer(6, warmup=1)
    stats.update(torch.randn(64, 6) * 5 + 2)
    adaptors = torch.nn.ModuleDict({"t/summary": FeatureAdaptor(512, 6, 1), "t/summary_stats": stats})
    student = FeatureStudent(backbone, adaptors, ["t"], ["summary"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = student(x, teacher="t")["summary"]
        adaptors["t/summary"].net[-1].weight.mul_(3)
        adaptors["t/summary"].net[-1].bias.mul_(3)
        after = student(x, teacher="t")["summary"]
        pred = adaptors["t/summary"](backbone_features(backbone, x)[0])
    assert torch.allclose(before, after, atol=1e-5)
    # the direction learned, at the length of a standardised teacher feature (sqrt(6)), in the teacher's space
    assert torch.allclose(after, F.normalize(pred, dim=-1) * 6 ** 0.5 * stats.std + stats.mean, atol=1e-5)
