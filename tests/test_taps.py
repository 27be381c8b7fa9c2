"""Forward-hook feature taps (hf_distill.models.taps): offline, tiny models, real forward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_distill.models.taps import (
    FeatureTaps,
    LayerNotFoundError,
    describe_layers,
    feature_tensor,
    format_layers,
    infer_layout,
    num_prefix_tokens,
    pool_features,
    probe_shapes,
    resolve_module,
    to_nchw,
)

SIZE = 32


def _x(batch=2, chans=3, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, chans, size, size, generator=g)


def timm_resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()


def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, num_classes=5,
    ).eval()


def timm_swin():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=SIZE, window_size=2, embed_dim=16,
        depths=(1, 1), num_heads=(1, 1), num_classes=5,
    ).eval()


def _vit_kwargs():
    return dict(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, num_labels=5)


def hf_vit():
    from transformers import AutoModelForImageClassification, ViTConfig

    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(ViTConfig(**_vit_kwargs())).eval()


def hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    return DeiTForImageClassification(DeiTConfig(**_vit_kwargs())).eval()


def hf_resnet():
    from transformers import AutoModelForImageClassification, ResNetConfig

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    return AutoModelForImageClassification.from_config(config).eval()


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_resolve_module_finds_dotted_names():
    model = timm_resnet()
    assert resolve_module(model, "layer2") is model.layer2
    assert resolve_module(model, "layer2.0.conv1") is model.layer2[0].conv1
    assert resolve_module(model, "") is model


def test_wrong_name_lists_close_names_and_how_to_list():
    model = timm_resnet()
    with pytest.raises(LayerNotFoundError) as info:
        resolve_module(model, "layer5")
    err = info.value
    assert isinstance(err, KeyError)
    message = str(err)
    assert not message.startswith(("'", '"'))  # the plain message, not KeyError's repr
    assert "'layer5'" in message and "'layer4'" in message
    assert "hf-distill layers" in message and "named_modules()" in message
    assert "layer4" in err.suggestions and len(err.suggestions) <= 5


def test_wrong_name_prefers_the_missing_prefix():
    model = hf_vit()
    with pytest.raises(LayerNotFoundError) as info:
        resolve_module(model, "layers.0")
    assert info.value.suggestions[0] == "vit.layers.0"


def test_taps_fail_at_construction_on_bad_name():
    model = timm_resnet()
    with pytest.raises(LayerNotFoundError, match="layer1"):
        FeatureTaps(model, ["layer1", "layr1"])
    assert _hooks_left(model) == 0


# ---------------------------------------------------------------------------------------------
# Outputs -> tensors
# ---------------------------------------------------------------------------------------------


def test_feature_tensor_of_tensors_tuples_and_model_outputs():
    from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput

    a, b = torch.randn(2, 3), torch.randn(2, 4)
    assert feature_tensor(a) is a
    assert feature_tensor((None, a, b)) is a
    assert feature_tensor([(a, b)]) is a
    assert feature_tensor(BaseModelOutput(last_hidden_state=b, hidden_states=(a,))) is b
    assert feature_tensor(ImageClassifierOutput(logits=a)) is a
    assert feature_tensor({"x": None, "y": b}) is b
    with pytest.raises(TypeError, match="feature tensor"):
        feature_tensor(None)
    with pytest.raises(TypeError, match="feature tensor"):
        feature_tensor((None, "text"))


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, {"aux": y.mean()}


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TupleBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.block(x)
        return self.head(y.mean((2, 3)))


def test_tap_on_module_returning_tuple():
    model = _TupleNet()
    x = _x(size=8)
    with FeatureTaps(model, ["block"]) as taps:
        model(x)
        feats = taps.pop()
    torch.testing.assert_close(feats["block"], model.block.conv(x))


# ---------------------------------------------------------------------------------------------
# Taps capture the real activations
# ---------------------------------------------------------------------------------------------


def test_taps_equal_hand_computed_cnn_activations():
    model = timm_resnet()
    x = _x()
    taps = FeatureTaps(model, ["layer1", "layer3", "act1"])
    assert len(taps) == 3
    logits = model(x)
    feats = taps.features
    assert list(feats) == ["act1", "layer1", "layer3"]  # in forward order
    with torch.no_grad():
        stem = model.act1(model.bn1(model.conv1(x)))
        l1 = model.layer1(model.maxpool(stem))
        l3 = model.layer3(model.layer2(l1))
        torch.testing.assert_close(feats["act1"], stem)
        torch.testing.assert_close(feats["layer1"], l1)
        torch.testing.assert_close(feats["layer3"], l3)
        torch.testing.assert_close(logits, model.forward_head(model.layer4(l3)))
    # forward_intermediates agrees too
    inter = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close(feats["layer1"], inter[0])
    torch.testing.assert_close(feats["layer3"], inter[1])
    assert taps.layouts == {"act1": "nchw", "layer1": "nchw", "layer3": "nchw"}
    taps.remove()


def test_taps_equal_vit_intermediates_and_keep_grad():
    model = timm_vit()
    x = _x()
    with FeatureTaps(model, ["blocks.0", "blocks.1"]) as taps:
        model(x)
        feats = taps.pop()
    assert feats["blocks.1"].shape == (2, 1 + 16, 32)
    assert feats["blocks.1"].requires_grad  # graph kept for hint losses
    inter = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True, output_fmt="NLC")
    # forward_intermediates drops the prefix tokens (NLC gives only patch tokens)
    torch.testing.assert_close(feats["blocks.0"][:, 1:], inter[0])
    torch.testing.assert_close(feats["blocks.1"][:, 1:], inter[1])
    assert taps.layouts == {"blocks.0": "tokens", "blocks.1": "tokens"}
    # the grid view of the taps equals timm's NCHW intermediates
    grid = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(to_nchw(feats["blocks.1"], "tokens", num_prefix_tokens(model)), grid)


def test_detach_and_pop_clear():
    model = timm_resnet().train()
    x = _x()
    taps = FeatureTaps(model, ["layer2"], detach=True)
    model(x)
    assert not taps.features["layer2"].requires_grad
    popped = taps.pop()
    assert set(popped) == {"layer2"}
    assert taps.features == {} and taps.pop() == {}
    taps.remove()


def test_run_until_complete_stops_the_forward_after_the_tapped_layers():
    model = timm_resnet().eval()
    x = _x()
    later = []
    model.layer3.register_forward_hook(lambda m, i, o: later.append(1))
    taps = FeatureTaps(model, ["layer1", "layer2"])
    feats = taps.run_until_complete(model, x)
    assert later == [] and set(feats) == {"layer1", "layer2"} and taps.features == {}
    with torch.no_grad():
        want = model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x))))))
    assert torch.allclose(feats["layer2"], want)
    out = model(x)  # a normal forward afterwards runs the whole model
    assert later == [1] and out.shape[0] == x.shape[0]
    taps.remove()


def test_run_until_complete_reports_tapped_layers_that_never_ran():
    model = timm_resnet().eval()
    taps = FeatureTaps(model, ["layer1", "fc"])
    with pytest.raises(RuntimeError, match="fc"):
        taps.run_until_complete(model.forward_features, _x())  # the head is not part of forward_features
    taps.remove()


def test_store_holds_only_the_last_forward():
    model = timm_resnet()
    taps = FeatureTaps(model, ["layer1", "layer2"])
    model(_x(seed=1))
    first = taps.features["layer1"]
    model(_x(seed=2))
    assert taps.features["layer1"] is not first
    torch.testing.assert_close(taps.features["layer1"], model.forward_intermediates(
        _x(seed=2), indices=[1], intermediates_only=True)[0])
    taps.pop()
    with torch.no_grad():
        partial = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1)
        out = partial(_x(seed=4))  # a different root: the store is not cleared, layer1 updated
    torch.testing.assert_close(taps.features["layer1"], out)
    taps.remove()


def test_remove_leaves_no_hooks_and_context_manager_removes():
    model = timm_resnet()
    before = _hooks_left(model)
    taps = FeatureTaps(model, ["layer1", "layer2.0.conv1"])
    assert _hooks_left(model) > before
    assert len(model.layer1._forward_hooks) == 1
    taps.remove()
    taps.remove()  # idempotent
    assert _hooks_left(model) == before
    assert len(model.layer1._forward_hooks) == 0 and len(model.layer2[0].conv1._forward_hooks) == 0
    with FeatureTaps(model, ["layer1"]) as taps2:
        model(_x())
        assert "layer1" in taps2.features
    assert _hooks_left(model) == 0
    assert taps2.features == {}


def test_same_module_tapped_twice_gets_one_hook():
    model = timm_resnet()
    taps = FeatureTaps(model, ["layer1", "layer1", "layer2"])
    assert taps.layers == ["layer1", "layer2"] and len(taps) == 2
    assert len(model.layer1._forward_hooks) == 1

    taps.remove()

    shared = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), shared)
    net.alias = shared  # the same module under two names (named_modules lists it once)
    taps2 = FeatureTaps(net, ["1", "alias"])
    assert len(shared._forward_hooks) == 1
    out = net(_x(size=4))
    feats = taps2.pop()
    assert feats["1"] is feats["alias"] and torch.equal(feats["1"], out)
    assert taps2.layouts == {"1": "nchw", "alias": "nchw"}
    taps2.remove()
    assert _hooks_left(net) == 0


def test_two_tap_sets_are_independent():
    model = timm_resnet()
    a = FeatureTaps(model, ["layer1"])
    b = FeatureTaps(model, ["layer1", "layer2"])
    model(_x())
    assert a.pop().keys() == {"layer1"}
    assert b.features.keys() == {"layer1", "layer2"}
    a.remove()
    assert len(model.layer1._forward_hooks) == 1
    b.remove()
    assert _hooks_left(model) == 0


def test_taps_survive_wrapping():
    model = timm_resnet()
    taps = FeatureTaps(model, ["layer2"])
    wrapper = nn.DataParallel(model)  # on CPU it just calls the module; hooks live on submodules
    x = _x()
    out = wrapper(x)
    assert out.shape == (2, 5)
    with torch.no_grad():
        expected = model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x))))))
    torch.testing.assert_close(taps.pop()["layer2"], expected)
    assert resolve_module(wrapper, "layer2") is model.layer2
    taps.remove()


def test_transformers_taps_on_model_output_modules():
    model = hf_resnet()
    x = _x()
    with FeatureTaps(model, ["resnet.encoder", "resnet.encoder.stages.1"]) as taps:
        model(pixel_values=x)
        feats = taps.pop()
    # the encoder returns a ModelOutput: its last_hidden_state is the last stage's output
    torch.testing.assert_close(feats["resnet.encoder"], feats["resnet.encoder.stages.1"])
    with torch.no_grad():
        emb = model.resnet.embedder(x)
        expected = model.resnet.encoder.stages[1](model.resnet.encoder.stages[0](emb))
    torch.testing.assert_close(feats["resnet.encoder.stages.1"], expected)
    assert taps.layouts["resnet.encoder.stages.1"] == "nchw"


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def test_layouts_cnn_vit_and_vectors():
    cnn = timm_resnet()
    assert infer_layout(cnn, "layer1", torch.zeros(1, 64, 8, 8)) == "nchw"
    assert infer_layout(cnn, "global_pool", torch.zeros(1, 512)) == "vector"
    vit = hf_vit()
    taps = FeatureTaps(vit, ["vit.layers.0", "vit.embeddings.patch_embeddings.projection", "classifier"])
    assert taps.layouts == {}  # inferred lazily, at the first capture
    vit(pixel_values=_x())
    assert taps.layouts == {
        "vit.layers.0": "tokens", "vit.embeddings.patch_embeddings.projection": "nchw", "classifier": "vector",
    }
    taps.remove()


def test_nhwc_inferred_for_timm_swin_and_override_wins():
    model = timm_swin()
    x = _x()
    taps = FeatureTaps(model, ["layers.0", "layers.1", "patch_embed.proj", "norm"])
    model(x)
    feats = taps.pop()
    assert feats["layers.1"].shape == (2, 4, 4, 32)  # [B, H, W, C]
    assert taps.layouts == {"layers.0": "nhwc", "layers.1": "nhwc", "patch_embed.proj": "nchw", "norm": "nhwc"}
    grid = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(to_nchw(feats["layers.1"], "nhwc"), grid)
    taps.remove()

    # user override wins over every rule
    assert infer_layout(model, "layers.1", feats["layers.1"], overrides={"layers.1": "nchw"}) == "nchw"
    with FeatureTaps(model, ["layers.1"], layouts={"layers.1": "nchw"}) as taps:
        assert taps.layouts == {"layers.1": "nchw"}  # known before any forward
        model(x)
        assert taps.layouts == {"layers.1": "nchw"}


def test_nhwc_for_plain_model_that_declares_it_and_last_dim_ops():
    class ChannelsLast(nn.Module):
        output_fmt = "NHWC"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.act = nn.GELU()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            x = self.act(self.conv(x).permute(0, 2, 3, 1))
            return self.fc(x)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.norm = nn.LayerNorm(8)
            self.act = nn.GELU()

        def forward(self, x):
            return self.act(self.norm(self.conv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    model = ChannelsLast()
    with FeatureTaps(model, ["conv", "act", "fc"]) as taps:
        model(_x(size=16))
        assert taps.layouts == {"conv": "nchw", "act": "nhwc", "fc": "nhwc"}
    plain = Plain()
    with FeatureTaps(plain, ["conv", "norm", "act"]) as taps:
        plain(_x(size=16))
        # the GELU after a LayerNorm is channels-last here, which no rule can see: override it
        assert taps.layouts == {"conv": "nchw", "norm": "nhwc", "act": "nchw"}
    with FeatureTaps(plain, ["act"], layouts={"act": "nhwc"}) as taps:
        plain(_x(size=16))
        assert to_nchw(taps.pop()["act"], taps.layouts["act"]).shape == (2, 8, 16, 16)


def test_bad_overrides_are_rejected():
    model = timm_resnet()
    with pytest.raises(ValueError, match="unknown layout"):
        FeatureTaps(model, ["layer1"], layouts={"layer1": "NCWH"})
    with pytest.raises(ValueError, match="not a tapped layer"):
        FeatureTaps(model, ["layer1"], layouts={"layer2": "nchw"})
    with FeatureTaps(model, ["layer1"], layouts={"layer1": "tokens"}):
        with pytest.raises(ValueError, match="4-D output"):
            model(_x())
    assert _hooks_left(model) == 0


def test_num_prefix_tokens():
    assert num_prefix_tokens(timm_resnet()) == 0
    assert num_prefix_tokens(timm_vit()) == 1
    assert num_prefix_tokens(hf_vit()) == 1
    assert num_prefix_tokens(hf_deit()) == 2
    assert num_prefix_tokens(hf_resnet()) == 0


def test_deit_tokens_to_grid():
    model = hf_deit()
    with FeatureTaps(model, ["deit.layers.1"]) as taps:
        model(pixel_values=_x())
        t = taps.pop()["deit.layers.1"]
        assert taps.layouts["deit.layers.1"] == "tokens"
    n = num_prefix_tokens(model)
    assert t.shape == (2, 2 + 16, 32)
    grid = to_nchw(t, "tokens", n)
    assert grid.shape == (2, 32, 4, 4)
    # patch token k sits at row k // 4, column k % 4
    torch.testing.assert_close(grid[:, :, 1, 2], t[:, n + 1 * 4 + 2])
    torch.testing.assert_close(pool_features(t, "tokens", n), t[:, 2:].mean(1))
    with pytest.raises(ValueError, match="cannot be mapped to a square grid"):
        to_nchw(t, "tokens", 1)  # 17 tokens left


def test_to_nchw_and_pool_features():
    x = torch.randn(2, 5, 3, 4)
    assert to_nchw(x, "nchw") is x
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    torch.testing.assert_close(to_nchw(nhwc, "nhwc"), x)
    torch.testing.assert_close(pool_features(nhwc, "nhwc"), x.mean((2, 3)))
    torch.testing.assert_close(pool_features(x, "nchw"), x.mean((2, 3)))
    tokens = torch.randn(2, 1 + 12, 5)
    torch.testing.assert_close(to_nchw(tokens, "tokens", 1, grid_size=(3, 4)).flatten(2).transpose(1, 2), tokens[:, 1:])
    v = torch.randn(2, 5)
    assert pool_features(v, "vector") is v and to_nchw(v, "vector").shape == (2, 5, 1, 1)
    with pytest.raises(ValueError, match="pool_features"):
        to_nchw(tokens, "tokens", 0)
    with pytest.raises(ValueError, match="dims"):
        to_nchw(tokens, "nchw")


# ---------------------------------------------------------------------------------------------
# Dry runs
# ---------------------------------------------------------------------------------------------


def test_probe_shapes_restores_modes_and_leaves_no_hooks():
    model = timm_resnet().train()
    model.bn1.eval()  # a frozen norm stays frozen
    shapes = probe_shapes(model, ["layer1", "layer4", "fc"], _x(batch=1))
    assert shapes == {"layer1": (1, 64, 8, 8), "layer4": (1, 512, 1, 1), "fc": (1, 5)}
    assert model.training and model.layer1.training and not model.bn1.training
    assert _hooks_left(model) == 0
    assert torch.is_grad_enabled()


def test_probe_shapes_on_transformers_and_custom_call():
    model = hf_vit().train()
    shapes = probe_shapes(model, ["vit.layers.1"], _x(batch=1))
    assert shapes == {"vit.layers.1": (1, 17, 32)}
    assert model.training
    calls = []

    def call(m, x):
        calls.append(x.shape)
        return m(pixel_values=x, interpolate_pos_encoding=True)

    assert probe_shapes(model, ["vit.layers.1"], _x(batch=1, size=64), call=call) == {"vit.layers.1": (1, 65, 32)}
    assert calls == [(1, 3, 64, 64)]


def test_probe_shapes_reports_layers_not_run():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 4, 1)
            self.unused = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match="unused"):
        probe_shapes(Net(), ["used", "unused"], _x(size=4))


def test_describe_layers_timm_resnet():
    model = timm_resnet().train()
    rows = describe_layers(model, image_size=SIZE)
    assert model.training and _hooks_left(model) == 0
    by_name = {r["name"]: r for r in rows}
    assert by_name["layer1"]["shape"] == (1, 64, 8, 8) and by_name["layer1"]["layout"] == "nchw"
    assert by_name["layer1"]["type"] == "Sequential"
    assert by_name["fc"]["layout"] == "vector"
    stages = [r["name"] for r in rows if r["stage"]]
    assert stages == ["layer1", "layer2", "layer3", "layer4"]  # the discovered stages (model_view), not the stem
    names = [r["name"] for r in rows]
    assert names.index("conv1.0") < names.index("layer1.0.conv1") < names.index("layer1") < names.index("fc")
    table = format_layers(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "type", "shape", "layout", "stage"]
    layer2 = next(line for line in lines if line.startswith("layer2 "))
    assert "1x128x4x4" in layer2 and layer2.rstrip().endswith("*")
    # columns are aligned
    assert len({line.index("Sequential") for line in lines if " Sequential " in line}) == 1
    shallow = describe_layers(model, image_size=SIZE, max_depth=1)
    assert all("." not in r["name"] for r in shallow) and any(r["name"] == "layer4" for r in shallow)


def test_describe_layers_transformers_and_plain_models():
    rows = describe_layers(hf_resnet(), image_size=SIZE, in_chans=3)
    stages = [r["name"] for r in rows if r["stage"]]
    assert stages == ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]
    assert {r["name"]: r["shape"] for r in rows}["resnet.encoder.stages.1"] == (1, 16, 4, 4)
    assert any(r["name"] == "resnet.encoder" for r in rows)  # ModelOutput -> last_hidden_state

    vit_rows = describe_layers(hf_vit(), image_size=None)  # the model's own size (32)
    assert [r["name"] for r in vit_rows if r["stage"]] == ["vit.layers.0", "vit.layers.1"]
    assert {r["name"]: r["layout"] for r in vit_rows}["vit.layers.0"] == "tokens"

    timm_rows = describe_layers(timm_vit(), image_size=None)  # timm ViT built at 32px
    assert {r["name"]: r["shape"] for r in timm_rows}["blocks.1"] == (1, 17, 32)

    plain = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 3),
    )
    rows = describe_layers(plain, image_size=16, in_chans=1)
    assert [r["name"] for r in rows if r["stage"]] == ["3"]  # the block before the second pool
