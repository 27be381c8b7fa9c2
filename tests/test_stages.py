"""Tests for hf_distill.models.stages: stem -> stages -> head views of classifiers."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hf_distill.models.stages import StagedModel, UnsupportedModelError, split_model, stage_names



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: intra-op threading only adds synchronisation, which becomes
    # pathologically slow (100x) when the cores are shared with other processes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


IMG = 32
VIT_KW = dict(img_size=IMG, patch_size=8)


def _timm(name, **kw):
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _hf(kind, **kw):
    from transformers import AutoModelForImageClassification, ConvNextConfig, ResNetConfig, ViTConfig

    if kind == "resnet":
        cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_labels=10, **kw)
    elif kind == "convnext":
        cfg = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=10, image_size=IMG, **kw)
    else:
        cfg = ViTConfig(
            image_size=IMG, patch_size=8, hidden_size=32, num_hidden_layers=8, num_attention_heads=4,
            intermediate_size=64, num_labels=10, **kw,
        )
    return AutoModelForImageClassification.from_config(cfg)


# id -> (factory, expected family, expected stage names or None)
FAMILIES = {
    "timm-resnet10t": (lambda: _timm("resnet10t"), "timm.ResNet", ["layer1", "layer2", "layer3", "layer4"]),
    "timm-resnet18d": (lambda: _timm("resnet18d"), "timm.ResNet", None),
    "timm-resnet26d": (lambda: _timm("resnet26d"), "timm.ResNet", None),
    "timm-convnext_atto": (
        lambda: _timm("convnext_atto"), "timm.ConvNeXt", ["stages.0", "stages.1", "stages.2", "stages.3"],
    ),
    "timm-efficientnet_b0": (
        lambda: _timm("efficientnet_b0"), "timm.EfficientNet", [f"blocks.{i}" for i in range(7)],
    ),
    "timm-mobilenetv2_050": (lambda: _timm("mobilenetv2_050"), "timm.EfficientNet", None),
    "timm-mobilenetv3_small_050": (
        lambda: _timm("mobilenetv3_small_050"), "timm.MobileNetV3", [f"blocks.{i}" for i in range(6)],
    ),
    "timm-regnetx_002": (lambda: _timm("regnetx_002"), "timm.RegNet", ["s1", "s2", "s3", "s4"]),
    # mlp_ratio keeps the 7x7 ConvMlp of pre_logits small (4096 -> 64 hidden channels)
    "timm-vgg11": (
        lambda: _timm("vgg11", mlp_ratio=1 / 64), "timm.VGG",
        ["features.2", "features.5", "features.10", "features.15", "features.20"],
    ),
    "timm-vit_tiny": (
        lambda: _timm("vit_tiny_patch16_224", **VIT_KW), "timm.VisionTransformer",
        ["blocks.2", "blocks.5", "blocks.8", "blocks.11"],
    ),
    "timm-deit_tiny": (lambda: _timm("deit_tiny_patch16_224", **VIT_KW), "timm.VisionTransformer", None),
    "timm-deit_tiny_distilled": (
        lambda: _timm("deit_tiny_distilled_patch16_224", **VIT_KW), "timm.VisionTransformer", None,
    ),
    "hf-resnet-bottleneck": (
        lambda: _hf("resnet", layer_type="bottleneck"), "transformers.ResNetForImageClassification",
        [f"resnet.encoder.stages.{i}" for i in range(4)],
    ),
    "hf-resnet-basic": (lambda: _hf("resnet", layer_type="basic"), "transformers.ResNetForImageClassification", None),
    "hf-convnext": (
        lambda: _hf("convnext"), "transformers.ConvNextForImageClassification",
        [f"convnext.encoder.stages.{i}" for i in range(4)],
    ),
    "hf-vit-sdpa": (
        lambda: _hf("vit"), "transformers.ViTForImageClassification",
        ["vit.layers.1", "vit.layers.3", "vit.layers.5", "vit.layers.7"],
    ),
    "hf-vit-eager": (lambda: _hf("vit", attn_implementation="eager"), "transformers.ViTForImageClassification", None),
}


@functools.lru_cache(maxsize=None)
def _model(fid):
    torch.manual_seed(0)
    return FAMILIES[fid][0]().eval()


def _input(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, IMG, IMG, generator=g)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@functools.lru_cache(maxsize=None)
def _reference(fid):
    """The model's own forward on _input(): (logits, {stage name: output seen by a forward hook})."""
    model = _model(fid)
    names = split_model(model).stage_names
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.clone()))
        for n in names
    ]
    try:
        with torch.no_grad():
            ref = _logits(model(_input()))
    finally:
        for h in handles:
            h.remove()
    return ref, seen


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    model = _model(request.param)
    model.eval()
    model.zero_grad(set_to_none=True)
    return request.param, model


def test_split_structure(family):
    fid, model = family
    _, fam, expected = FAMILIES[fid]
    split = split_model(model)
    assert isinstance(split, StagedModel)
    assert split.family == fam
    assert split.model is model
    assert len(split) == len(split.stage_names) >= 2
    if expected is not None:
        assert split.stage_names == expected
    assert stage_names(model) == split.stage_names
    modules = dict(model.named_modules())
    assert all(n in modules for n in split.stage_names)
    # parameters are shared, not copied
    assert [id(p) for p in split.parameters()] == [id(p) for p in model.parameters()]


@torch.no_grad()
def test_logits_exact(family):
    fid, model = family
    ref, _ = _reference(fid)
    assert torch.equal(split_model(model)(_input()), ref)


@torch.no_grad()
def test_stage_outputs_match_forward_hooks(family):
    fid, model = family
    split = split_model(model)
    ref, seen = _reference(fid)
    assert set(seen) == set(split.stage_names)
    h = split.stem(_input())
    for i, name in enumerate(split.stage_names):
        h = split.run_stage(i, h)
        assert torch.equal(h, seen[name]), name
    assert torch.equal(split.head(h), ref)
    outs, logits = split.forward_stages(_input())
    assert torch.equal(logits, ref)
    assert all(torch.equal(o, seen[n]) for o, n in zip(outs, split.stage_names))


@torch.no_grad()
def test_forward_from_every_stage(family):
    fid, model = family
    split = split_model(model)
    ref, seen = _reference(fid)
    inputs = [split.stem(_input())] + [seen[n] for n in split.stage_names]
    for i, h in enumerate(inputs):  # i == K: head only
        assert torch.equal(split.forward_from(i, h), ref), i
    with pytest.raises(IndexError):
        split.forward_from(len(split) + 1, inputs[-1])


def test_gradients_reach_stem(family):
    _, model = family
    split = split_model(model)
    x = _input()
    try:
        split(x).float().pow(2).mean().backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        _logits(model(x)).float().pow(2).mean().backward()
        theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
    # every parameter of these classifiers is used by the forward
    assert set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    first = next(n for n, _ in model.named_parameters())  # in the stem (stage 0 for VGG)
    assert ours[first].abs().sum() > 0, first
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------------- training mode / dropout
@pytest.mark.parametrize(
    "factory",
    [
        lambda: _timm("resnet10t", drop_rate=0.3, drop_path_rate=0.2),
        lambda: _timm("vit_tiny_patch16_224", depth=4, drop_rate=0.1, drop_path_rate=0.1, **VIT_KW),
        lambda: _hf("vit", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="eager"),
    ],
    ids=["timm-resnet", "timm-vit", "hf-vit"],
)
def test_train_mode_same_random_ops(factory):
    torch.manual_seed(0)
    model = factory().train()
    split = split_model(model)
    x = _input()
    torch.manual_seed(123)
    a = split(x)
    torch.manual_seed(123)
    b = _logits(model(x))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------- grouping / overrides
def test_vit_num_groups():
    model = _model("timm-vit_tiny")  # depth 12
    assert split_model(model, num_groups=3).stage_names == ["blocks.3", "blocks.7", "blocks.11"]
    assert split_model(model, num_groups=12).stage_names == [f"blocks.{i}" for i in range(12)]
    assert stage_names(model, num_groups=2) == ["blocks.5", "blocks.11"]

    torch.manual_seed(0)
    uneven = _timm("vit_tiny_patch16_224", depth=6, **VIT_KW).eval()
    split = split_model(uneven)  # 6 blocks into 4 groups: sizes 2, 2, 1, 1
    assert split.stage_names == ["blocks.1", "blocks.3", "blocks.4", "blocks.5"]
    x = _input()
    with torch.no_grad():
        assert torch.equal(split(x), uneven(x))


@torch.no_grad()
def test_builtin_stage_override():
    model = _model("timm-resnet10t")
    x = _input()
    ref = model(x)
    split = split_model(model, stage_names=["layer2", "layer4"])
    assert len(split) == 2 and torch.equal(split(x), ref)
    assert torch.equal(split.run_stage(0, split.stem(x)), model.layer2(model.layer1(split.stem(x))))
    # stopping early: the remaining units run in the head
    early = split_model(model, stage_names=["layer1", "layer2"])
    assert torch.equal(early(x), ref)
    assert torch.equal(split_model(model, num_groups=2)(x), ref)

    vit = _model("timm-vit_tiny")
    split = split_model(vit, stage_names=["blocks.0", "blocks.6"])
    assert torch.equal(split(x), vit(x))

    with pytest.raises(UnsupportedModelError, match="layer1"):
        split_model(model, stage_names=["layer1.0"])
    with pytest.raises(UnsupportedModelError, match="order"):
        split_model(model, stage_names=["layer3", "layer2"])


def test_wide_resnet_is_resnet():
    with torch.device("meta"):
        model = timm.create_model("wide_resnet50_2", pretrained=False)
    assert isinstance(model, timm.models.resnet.ResNet)
    split = split_model(model)
    assert split.family == "timm.ResNet"
    assert split.stage_names == ["layer1", "layer2", "layer3", "layer4"]


def test_subclass_with_custom_forward_is_rejected():
    class MyResNet(timm.models.resnet.ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    model = MyResNet(block=timm.models.resnet.BasicBlock, layers=[1, 1, 1, 1], num_classes=10)
    with pytest.raises(UnsupportedModelError, match="stage_names="):
        split_model(model)


def test_deepcopy_keeps_split_consistent():
    model = _model("timm-resnet10t")
    split = split_model(model)
    clone = copy.deepcopy(split)
    assert clone.model is not model
    assert clone.stage_names == split.stage_names
    with torch.no_grad():
        clone.model.fc.weight.add_(1.0)
        x = _input()
        assert torch.equal(clone(x), clone.model(x))
        assert not torch.equal(clone(x), model(x))


# ---------------------------------------------------------------------- declared splits
class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_declared_split_custom_module():
    torch.manual_seed(0)
    model = _Custom().eval()
    split = split_model(
        model, stage_names=["block1", "block2"], stem=["conv", "bn", "act"], head=["avgpool", "flatten", "fc"]
    )
    assert split.family == "declared" and len(split) == 2
    x = _input()
    with torch.no_grad():
        assert torch.equal(split(x), model(x))
        h0 = split.stem(x)
        h1 = split.run_stage(0, h0)
        assert torch.equal(h1, model.block1(h0))
        assert torch.equal(split.forward_from(1, h1), model(x))
    split.check(x)
    split(x).sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_declared_split_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    split = split_model(model, stage_names=["2", "3"], stem=["0", "1"], head=["4", "5", "6"])
    x = _input()
    with torch.no_grad():
        assert torch.equal(split(x), model(x))
    # a wrong declaration (ReLU "1" left out) is caught by check()
    bad = split_model(model, stage_names=["2", "3"], stem=["0"], head=["4", "5", "6"])
    with pytest.raises(AssertionError, match="differs"):
        bad.check(x)
    # an empty stem is allowed
    blocks = nn.Sequential(model[2], model[3], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    split = split_model(blocks, stage_names=["0", "1"], stem=[], head=["2", "3", "4"])
    h = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(split(h), blocks(h))
        assert torch.equal(split.stem(h), h)


def test_unknown_module_raises_with_instructions():
    model = _Custom()
    with pytest.raises(UnsupportedModelError) as err:
        split_model(model)
    msg = str(err.value)
    for word in ("stage_names=", "stem=", "head=", "_Custom", "block1"):  # split_model's keywords, one line
        assert word in msg
    assert "\n" not in msg and len(msg) < 400
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnsupportedModelError, match="stage names alone"):
        split_model(model, stage_names=["block1", "block2"])  # stem/head not declared
    with pytest.raises(UnsupportedModelError, match="missing \\['head'\\]"):
        split_model(model, stage_names=["block1"], stem=["conv"])
    with pytest.raises(UnsupportedModelError, match="nope"):
        split_model(model, stage_names=["block1", "nope"], stem=["conv"], head=["fc"])
    with pytest.raises(UnsupportedModelError, match="avgpool"):  # pseudo-names only in stem/head
        split_model(model, stage_names=["avgpool"], stem=["conv"], head=["fc"])
