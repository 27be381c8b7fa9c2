"""Any backbone: the stages hf_distill.models.view discovers, and FitNets auto / BYOT / SFTN on them.

One model per code path of the view: timm feature maps (a family with no hand-written split),
timm tokens with prefix tokens (DeiT distilled), timm channels-last maps (Swin), transformers
hidden states (ViT, DeiT), transformers reshaped hidden states (Swin), a plain module. The full
sweep over every family is benchmarks/compat_sweep.py (docs/compatibility.md).
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import tiny_spec
from torch import nn

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images, with_image_transform
from hf_distill.models.middle import MiddleRunner
from hf_distill.models.view import StagesNotFoundError, model_view, token_grid, tokens_to_map
from hf_distill.models import set_input_spec
from hf_distill.models.taps import FeatureTaps

SPEC = tiny_spec(size=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data(digits):
    return with_image_transform(digits["train"].select(range(32)), SPEC)


def _timm(name, seed=0, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **kw)
    set_input_spec(m, SPEC)
    return m


def byobnet(seed=0):  # a timm family with no hand-written split in hf_distill.models.stages
    return _timm("test_byobnet", seed)


def deit(seed=0):
    return _timm("deit_tiny_distilled_patch16_224", seed, img_size=32, patch_size=8, embed_dim=32, depth=4,
                 num_heads=2)


def timm_swin(seed=0):
    return _timm("swin_tiny_patch4_window7_224", seed, img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1),
                 num_heads=(1, 1, 1))


def hf(kind, seed=0, size=32):
    import transformers as tr

    torch.manual_seed(seed)
    small = dict(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_size=64, num_labels=10, num_channels=1)
    if kind == "vit":
        m = tr.ViTForImageClassification(tr.ViTConfig(**small))
    elif kind == "deit":
        m = tr.DeiTForImageClassification(tr.DeiTConfig(**small))
    else:
        m = tr.SwinForImageClassification(tr.SwinConfig(image_size=size, patch_size=2, embed_dim=8, depths=[1, 1, 1],
                                                         num_heads=[1, 1, 1], window_size=2, num_labels=10,
                                                         num_channels=1))
    set_input_spec(m, SPEC)
    return m


class Plain(nn.Module):
    """No library: stages found by a probe of its children."""

    def __init__(self, reuse_input=False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)
        self.num_classes = 10
        self.reuse_input = reuse_input

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.stem(x))))
        out = self.fc(h.mean((2, 3)))
        return out + x.mean() if self.reuse_input else out  # the head sees the input again: no split


def _x(n=2, size=(32, 32), seed=0):
    return torch.randn(n, 1, *size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ discovery
def test_timm_feature_info_stages_without_a_hand_written_split():
    m = byobnet()
    v = model_view(m)
    declared = {d["module"]: (d["num_chs"], d["reduction"]) for d in m.feature_info if d["reduction"] >= 4}
    assert v.source == "timm feature_info" and v.names() == list(declared)  # the stride-2 stem is dropped
    assert {s.name: (s.channels, s.reduction) for s in v.stages} == declared
    assert v.middle() == list(declared)[2]


def test_timm_tokens_count_prefix_tokens_from_the_output_and_map_on_the_grid():
    m = deit()
    v = model_view(m)
    assert v.names() == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    stage = v.stage("blocks.1")
    assert (stage.num_prefix_tokens, stage.grid, stage.layout) == (2, (4, 4), "tokens")
    x = _x()
    with FeatureTaps(m, ["blocks.1"]) as taps, torch.no_grad():
        m.eval()(x)
        t = taps.pop()["blocks.1"]
    want = t[:, 2:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)  # class + distillation token, then the grid
    assert torch.equal(tokens_to_map(t, stage), want)


def test_timm_channels_last_stages():
    v = model_view(timm_swin())
    assert [s.layout for s in v.stages] == ["nhwc"] * 3 and [s.reduction for s in v.stages] == [4, 8, 16]


def test_transformers_hidden_states_are_the_stage_outputs():
    for kind, prefix in (("vit", 1), ("deit", 2)):
        m = hf(kind).eval()
        v = model_view(m)
        assert v.source == "transformers hidden_states" and len(v.stages) == 4
        assert all(s.num_prefix_tokens == prefix and s.grid == (4, 4) for s in v.stages)
        x = _x()
        with FeatureTaps(m, v.names()) as taps, torch.no_grad():
            hidden = m(pixel_values=x, output_hidden_states=True).hidden_states
            feats = taps.pop()
        for i, name in enumerate(v.names()):
            assert torch.equal(feats[name], hidden[i + 1])


def test_transformers_reshaped_hidden_states_give_the_grid_also_non_square():
    m = hf("swin").eval()
    v = model_view(m)
    assert v.source == "transformers hidden_states (reshaped)"
    assert [s.grid for s in v.stages] == [(8, 8), (4, 4), (4, 4)]
    x = _x(size=(32, 48))  # non-square: the grid comes from the input size and the stage's reduction
    with FeatureTaps(m, v.names()) as taps, torch.no_grad():
        out = m(pixel_values=x, output_hidden_states=True)
        feats = taps.pop()
    for i, stage in enumerate(v.stages):
        assert torch.equal(tokens_to_map(feats[stage.name], stage, (32, 48)), out.reshaped_hidden_states[i + 1])


def test_plain_module_children_by_output_shape_and_declared_stage_modules():
    m = Plain()
    assert model_view(m).names() == ["block1", "block2", "block3"]
    declared = Plain()
    declared.stage_modules = ["block2", "block3"]
    v = model_view(declared)
    assert v.source == "declared stage_modules" and v.names() == ["block2", "block3"]
    flat = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 10))
    set_input_spec(flat, SPEC)  # one stage only: nothing to pair or exit from
    with pytest.raises(StagesNotFoundError) as err:
        model_view(flat)
    assert "\n" not in str(err.value) and "hint_layers" in str(err.value)


def test_token_grid_prefers_the_models_prefix_count():
    assert token_grid(16, (224, 224), 56.0) == (0, 4, 4)  # ceil (a padded stage) before a 3x3 + 7 prefix
    assert token_grid(198, (224, 224), 16.0, expected_prefix=2) == (2, 14, 14)
    assert token_grid(142, (224, 160), 16.0, expected_prefix=2) == (2, 14, 10)


# ------------------------------------------------------------------------------------------ from the middle
def test_middle_runner_is_bit_identical_and_refuses_a_model_that_reuses_its_input():
    m = byobnet().eval()
    v = model_view(m)
    runner = MiddleRunner(m, v.names())
    x = _x()
    runner.verify(x)
    with FeatureTaps(m, [v.names()[1]]) as taps, torch.no_grad():
        ref = m(x)
        h = taps.pop()[v.names()[1]]
        assert torch.equal(runner.forward_from(2, h, (32, 32)), ref)
    bad = Plain(reuse_input=True).eval()
    with pytest.raises(StagesNotFoundError) as err:
        MiddleRunner(bad, model_view(bad).names()).verify(x)
    assert "\n" not in str(err.value) and "differs" in str(err.value)


# ------------------------------------------------------------------------------------------ methods
def _trainer(model, data, make_args, teacher=None, **kw):
    return DistillationTrainer(model=model, teacher_model=teacher, train_dataset=data, eval_dataset=data,
                               args=make_args(max_steps=2, logging_steps=1, **kw))


def test_fitnets_auto_pairs_a_cnn_with_a_vit_both_ways(data, make_args):
    batch = collate_images([data[i] for i in range(4)])
    for student, teacher, want in ((byobnet(1), hf("deit", 2), ("stages.2", "deit.layers.2")),
                                   (deit(1), byobnet(2), ("blocks.2", "stages.2"))):
        t = _trainer(student, data, make_args, teacher, distill_method="fitnets", hint_layers=["auto"],
                     hint_weight=1.0)
        assert t.method.pairs == [want]
        t.model.train()
        t.compute_loss(t.model, batch).backward()
        reg = t.extra_modules["0"]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters() if p.requires_grad)
    t.train()


def test_byot_exits_on_hierarchical_tokens_and_export_runs_early_exit(data, make_args, tmp_path):
    from hf_distill.models.exits import MultiExitModel

    t = _trainer(hf("swin", 1), data, make_args, distill_method="byot")
    assert t.method.exit_layers == ["swin.encoder.layers.0", "swin.encoder.layers.1"]
    t.train()
    assert "eval_exit1_accuracy" in t.evaluate()

    student = byobnet(3)
    t = _trainer(student, data, make_args, distill_method="byot", byot_export_exits=True)
    t.train()
    t.save_model(str(tmp_path / "m"))
    multi = MultiExitModel.from_pretrained(str(tmp_path / "m"))
    x = _x(3)
    with torch.no_grad():
        ref = multi.student(x)
        with FeatureTaps(multi.student, [multi.exits[0].spec.layer]) as taps:
            multi.student(x)
            first = multi.exits[0](taps.pop()[multi.exits[0].spec.layer])[0]
    logits, used = multi(x, early_exit_threshold=1.1)  # never confident: the deepest classifier
    assert used.tolist() == [3, 3, 3] and torch.equal(logits, ref)
    logits, used = multi(x, early_exit_threshold=0.0)  # all leave at the first exit
    assert used.tolist() == [0, 0, 0] and torch.allclose(logits, first, atol=1e-6)


def test_byot_export_refuses_a_model_it_cannot_run_from_the_middle(data, make_args):
    m = Plain(reuse_input=True)
    set_input_spec(m, SPEC)
    _trainer(m, data, make_args, distill_method="byot")  # training needs the features only
    with pytest.raises(ValueError) as err:
        _trainer(m, data, make_args, distill_method="byot", byot_export_exits=True)
    msg = str(err.value)
    assert "\n" not in msg and "byot_export_exits" in msg and "stem_modules" not in msg


def test_sftn_branches_run_a_student_without_a_hand_written_split(data, make_args):
    teacher = hf("vit", 1)
    t = _trainer(teacher, data, make_args, distill_method="sftn", sftn_student_model="test_byobnet")
    assert len(t.extra_modules) == 3
    branch = t.extra_modules["branch1"]
    assert "runner" in branch.__dict__  # the student copy runs through its own forward
    t.train()
    assert "eval_branch1_accuracy" in t.evaluate()
    # the copy's stages before the branch point are frozen; later ones train
    frozen = {n for n, p in branch.student.named_parameters() if not p.requires_grad}
    assert any(n.startswith("stem") for n in frozen) and not any(n.startswith("head") for n in frozen)


def test_layers_command_shows_the_discovered_stages(capsys, tmp_path):
    from hf_distill.cli import main

    main(["layers", "test_byobnet", "--image-size", "32"])
    text = capsys.readouterr().out
    table = text[text.index("stage   "):]
    assert "stages from timm feature_info" in table and "FitNets auto: stages.2" in table
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["stages.0", "stages.1", "stages.2", "final_conv"]
    hf("swin").save_pretrained(tmp_path / "swin")  # a transformers folder: hidden states, reshaped grids
    main(["layers", str(tmp_path / "swin")])
    assert "transformers hidden_states (reshaped)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ known sweep failures
def test_weights_shared_by_modules_save_and_reload_to_identical_outputs(tmp_path):
    """CoaT's blocks share their conv position encodings: safetensors refuses shared tensors, so each name
    is written (one copy each) and timm's strict load fills them back, still shared."""
    from hf_distill.models import load_native_weights, save_native

    m = _timm("coat_tiny", 1, img_size=32, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1),
              parallel_depth=0, num_heads=8).eval()
    assert m.serial_blocks1[0].cpe is m.cpe1  # the case: one module under two names
    save_native(m, tmp_path / "coat")
    back = timm.create_model(f"local-dir:{tmp_path / 'coat'}", pretrained=True).eval()
    x = _x()
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
    assert back.serial_blocks1[0].cpe is back.cpe1
    plain = Plain()
    plain.tied = plain.block1  # a plain module: the same weights under two names
    nn.init.normal_(plain.block1[0].weight)
    save_native(plain, tmp_path / "plain")
    again = Plain()
    again.tied = again.block1
    load_native_weights(again, tmp_path / "plain")
    assert torch.equal(again.block1[0].weight, plain.block1[0].weight) and again.tied is again.block1


def test_byot_exits_before_a_class_token_joins_compare_maps(data, make_args):
    """ConViT adds its class token after the first blocks (16 tokens, then 1 + 16): the exits there and the
    deepest feature are compared as maps on the patch grid, not as token sequences of another length."""
    student = _timm("convit_tiny", 1, img_size=32, patch_size=8, embed_dim=16, depth=4, local_up_to_layer=2,
                    num_heads=2)
    t = _trainer(student, data, make_args, distill_method="byot")
    assert [s.num_prefix_tokens for s in model_view(student).stages] == [0, 0, 1, 1]
    assert not any(head.tokens for head in t.extra_modules.values())
    batch = collate_images([data[i] for i in range(4)])
    t.model.train()
    loss = t.compute_loss(t.model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert t.extra_modules["exit1"].bottleneck[0].weight.grad.abs().sum() > 0


def test_pooler_built_only_on_request_is_not_the_feature_summary(tmp_path):
    """Data2VecVisionModel builds its pooler only when asked (add_pooling_layer=False): the exported
    backbone reloads with AutoModel without it, so the summary hf_distill trains must not come from it."""
    import transformers as tr

    from hf_distill.models.features import backbone_features, export_backbone
    from hf_distill.models import save_native

    torch.manual_seed(0)
    m = tr.Data2VecVisionForImageClassification(tr.Data2VecVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10, num_channels=1, use_mean_pooling=True)).eval()
    set_input_spec(m, SPEC)
    backbone = export_backbone(m)
    assert backbone.pooler is not None  # the classifier's base model has one
    save_native(backbone, tmp_path / "b")
    back = tr.AutoModel.from_pretrained(tmp_path / "b").eval()
    assert back.pooler is None
    x = _x()
    with torch.no_grad():
        ours, theirs = backbone_features(backbone, x), backbone_features(back, x)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_backbone_automodel_does_not_map_loads_with_the_class_its_config_names(tmp_path):
    """transformers 5.25 maps MetaClip 2's whole model but not its vision tower through AutoModel: the
    exported tower loads with the class its config names."""
    import transformers as tr

    from hf_distill import load_model
    from hf_distill.models.features import backbone_features
    from hf_distill.models import save_native

    torch.manual_seed(0)
    tower = tr.MetaClip2VisionModel(tr.MetaClip2VisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_channels=1)).eval()
    set_input_spec(tower, SPEC)
    save_native(tower, tmp_path / "t")
    with pytest.raises(ValueError):
        tr.AutoModel.from_pretrained(tmp_path / "t")  # the case: AutoModel does not know the type
    back = load_model(str(tmp_path / "t"), backbone=True).eval()
    assert type(back) is tr.MetaClip2VisionModel
    x = _x()
    with torch.no_grad():
        assert torch.equal(backbone_features(tower, x)[0], backbone_features(back, x)[0])


def test_token_grids_come_from_the_model_at_a_non_square_size():
    """Twins has no single patch_embed (one per stage): its grids are read from forward_intermediates at the
    real input size, never a square guessed from the token count; Hiera's reshaped maps are channels-last."""
    import transformers as tr

    from hf_distill.models import InputSpec

    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(32, 64), in_chans=1)
    twins = _timm("twins_svt_small", 0, img_size=(32, 64), embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                  num_heads=(1, 1, 1, 1))
    set_input_spec(twins, spec)
    view = model_view(twins)
    assert [(s.grid, s.num_prefix_tokens) for s in view.stages] == [((8, 16), 0), ((4, 8), 0), ((2, 4), 0), ((1, 2), 0)]
    tokens = twins.forward_features(_x(size=(32, 64)))
    assert tuple(tokens_to_map(tokens, view.stages[-1]).shape) == (2, 16, 1, 2)

    torch.manual_seed(0)
    hiera = tr.HieraForImageClassification(tr.HieraConfig(
        image_size=[32, 64], embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_labels=10,
        num_channels=1, mlp_ratio=2.0))
    set_input_spec(hiera, spec)
    assert [s.grid for s in model_view(hiera).stages] == [(8, 16), (4, 8), (2, 4), (1, 2)]
