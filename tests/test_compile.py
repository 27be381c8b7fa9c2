"""Compiled training: no graph break and no recompilation after the first steps for every method, the same
losses as eager, compiled teachers equal to eager ones, channels-last equal to contiguous.

Dynamo's own counters (``torch._dynamo.utils.counters``) are read over real ``Trainer.train()`` runs, the
teachers compiled too (``teacher_compile`` follows ``torch_compile``). Graph breaks and recompilations
are decided by dynamo's tracing, whatever the backend: the counting runs use the ``eager`` backend (no
code generation), the loss comparisons ``aot_eager`` (forward and backward graphs as inductor gets them).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch._dynamo
from conftest import tiny_hf_resnet, tiny_spec, tiny_timm
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from hf_distill import DistillationTrainer, set_input_spec
from hf_distill.data import with_image_transform
from hf_distill.teachers import Teachers

SPEC = tiny_spec()  # 16 px, 1 channel
BATCH = 8  # 64 images: 8 full batches per epoch, no smaller last batch (a new shape would recompile)


@pytest.fixture(scope="module")
def data(digits):
    return with_image_transform(digits["train"].select(range(64)), SPEC)


def tiny_vit(seed=0, num_classes=10):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2, num_classes=num_classes, in_chans=1)
    set_input_spec(model, SPEC)
    return model


def tiny_deit(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2, num_classes=10, in_chans=1)
    set_input_spec(model, SPEC)
    return model


def backbone(name, seed=0):
    if name == "vit":
        return tiny_vit(seed=seed, num_classes=0)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1)
    set_input_spec(model, SPEC)
    return model


FAMILIES = {"timm_cnn": lambda seed: tiny_timm(seed=seed), "timm_vit": tiny_vit,
            "transformers": lambda seed: tiny_hf_resnet(seed=seed)}


class _GraphCount(TrainerCallback):
    """Dynamo's compiled graphs so far, after each optimizer step."""

    def __init__(self):
        self.graphs: list[int] = []

    def on_step_end(self, args, state, control, **kw):
        self.graphs.append(counters["stats"]["unique_graphs"])


def _train(make_args, data, student, teacher=None, backend=None, steps=4, **kw):
    """(per-step losses, per-step graph counts, graph breaks) of a short run."""
    torch._dynamo.reset()
    counters.clear()
    compile_kw = dict(torch_compile=True, torch_compile_backend=backend) if backend else {}
    args = make_args(per_device_train_batch_size=BATCH, max_steps=steps, logging_steps=1, **compile_kw, **kw)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    count = _GraphCount()
    trainer.add_callback(count)
    losses, compute_loss = [], trainer.compute_loss

    def recorded(model, inputs, *a, **k):
        loss = compute_loss(model, inputs, *a, **k)
        if model.training:
            losses.append(loss.item())
        return loss

    trainer.compute_loss = recorded
    trainer.train()
    breaks = sum(counters["graph_break"].values())
    return losses, count.graphs, breaks, trainer


def _check_compiled(graphs, breaks, settled_from=1, expected=None):
    assert breaks == 0, dict(counters["graph_break"])
    # every graph is compiled by the first step of its stage; later steps reuse them
    assert graphs[settled_from - 1] >= 1 and graphs[settled_from - 1:] == [graphs[-1]] * (len(graphs) - settled_from + 1), graphs
    if expected is not None:
        assert graphs[-1] == expected, graphs


# --- same losses as eager (aot_eager), break-free, no recompilation -------------------------------------

PARITY = {
    # method: (student, teacher, arguments, first step after which no graph is added, graphs: student + teacher)
    "kd": (lambda: tiny_timm(seed=1), lambda: tiny_timm(seed=2), {}, 1, 2),
    # stage 1 (hints only, teacher stopped early) for 2 steps, then stage 2 (KD + annealed soft weight)
    "fitnets": (lambda: tiny_timm(seed=1), lambda: tiny_hf_resnet(seed=2),
                dict(distill_method="fitnets", hint_layers=["layer1:resnet.encoder.stages.1"], hint_epochs=0.25,
                     hint_weight=0.0), 3, 4),
    "byot": (lambda: tiny_timm(seed=1), lambda: None, dict(distill_method="byot"), 1, 1),
    "feature": (lambda: backbone("resnet10t", 1), lambda: [backbone("vit", 2), backbone("test_resnet", 3)],
                dict(distill_method="feature"), 1, 3),
    "token": (lambda: tiny_deit(seed=1), lambda: tiny_timm(seed=2), {}, 1, 2),
}


@pytest.mark.parametrize("method", list(PARITY))
def test_compiled_training_gives_the_eager_losses(method, make_args, data):
    student, teacher, kw, settled, n_graphs = PARITY[method]
    eager, *_ = _train(make_args, data, student(), teacher(), steps=3 if method != "fitnets" else 4, **kw)
    compiled, graphs, breaks, trainer = _train(make_args, data, student(), teacher(), backend="aot_eager",
                                               steps=len(eager), **kw)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert len(trainer.teachers) == 0 or trainer.teachers.compile_options == {"backend": "aot_eager", "mode": None}
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)
    _check_compiled(graphs, breaks, settled, n_graphs)


# --- every method on each model family: no break, no recompilation (dynamo's tracing alone) -------------

def _cases():
    cases = []
    for family in FAMILIES:
        cases += [(family, "kd", {}), (family, "dkd", dict(distill_method="dkd", dkd_warmup_epochs=0.25)),
                  (family, "dist", dict(distill_method="dist")),
                  (family, "kd+mixup", dict(mixup_alpha=0.4, cutmix_alpha=1.0)),
                  (family, "byot", dict(distill_method="byot")),
                  (family, "sftn", dict(distill_method="sftn", sftn_student_model="test_resnet")),
                  (family, "feature", dict(distill_method="feature"))]
    hint = {"timm_cnn": "layer2:layer2", "timm_vit": "blocks.0:blocks.1",
            "transformers": "resnet.encoder.stages.0:resnet.encoder.stages.1"}
    for family, pair in hint.items():  # stage 1 for 2 steps, then stage 2
        cases.append((family, "fitnets", dict(distill_method="fitnets", hint_layers=[pair], hint_epochs=0.25)))
    # already counted, on the same models, by the loss comparisons above
    covered = {("timm_cnn", "kd"), ("timm_cnn", "byot"), ("timm_cnn", "feature"), ("timm_cnn", "fitnets")}
    return [c for c in cases if (c[0], c[1]) not in covered]


@pytest.mark.parametrize("family,method,kw", _cases(), ids=[f"{c[0]}-{c[1]}" for c in _cases()])
def test_no_graph_break_and_no_recompilation(family, method, kw, make_args, data):
    make = FAMILIES[family]
    if method == "feature":
        if family == "transformers":
            from transformers import ResNetConfig, ResNetModel

            torch.manual_seed(1)
            student = ResNetModel(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                               layer_type="basic"))
            set_input_spec(student, SPEC)
        else:
            student = backbone("vit" if family == "timm_vit" else "resnet10t", 1)
        teacher = backbone("test_resnet", 2)
    elif method in ("byot", "sftn"):
        student, teacher = make(1), None
    else:
        student, teacher = make(1), make(2)
    settled = 3 if method in ("fitnets", "dkd") else 1  # fitnets: stage 2 from step 3
    _, graphs, breaks, trainer = _train(make_args, data, student, teacher, backend="eager", steps=4, **kw)
    _check_compiled(graphs, breaks, settled)


# --- compiled teachers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_teachers_equal_eager_ones(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    models = [tiny_timm(seed=2), tiny_vit(seed=3)]  # (a transformers teacher compiles in the FitNets run above)
    eager = Teachers(models, SPEC, layers=["layer1"]).to(dtype=dtype)
    compiled = Teachers(models, SPEC, layers=["layer1"]).compile(backend="aot_eager")
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    want, got = eager(x), compiled(x)
    assert all(g.dtype == torch.float32 and not g.is_inference() for g in got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, **tol)
    torch.testing.assert_close(compiled.pop_features()["layer1"], eager.pop_features()["layer1"], **tol)
    # the hints alone (FitNets stage 1): the first teacher stops after its tapped layer, compiled as well
    torch.testing.assert_close(compiled.features_only(x)["layer1"], eager.features_only(x)["layer1"], **tol)
    for (ws, wm), (gs, gm) in zip(eager.backbone_features(x), compiled.backbone_features(x)):
        torch.testing.assert_close(gs, ws, **tol)
        torch.testing.assert_close(gm, wm, **tol)
    assert len(compiled._compiled) == 2 + 1 + 2  # logits per teacher, the early stop, features per teacher


def test_inductor_teacher_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    teacher = tiny_timm(seed=2)
    want = Teachers([teacher], SPEC)(x)[0]
    got = Teachers([teacher], SPEC).compile(backend="inductor")(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_teacher_cache_built_by_a_compiled_teacher(digits, tmp_path):
    from hf_distill.teacher_cache import build_teacher_cache, with_teacher_cache

    raw = digits["train"].select(range(16))
    teacher = tiny_timm(seed=2)
    for name, opts in (("eager", None), ("compiled", {"backend": "aot_eager"})):
        build_teacher_cache(teacher, raw, SPEC, tmp_path / name, batch_size=8, teacher_compile=opts)
    eager, compiled = (with_teacher_cache(raw, str(tmp_path / n), SPEC) for n in ("eager", "compiled"))
    for i in range(16):
        torch.testing.assert_close(torch.as_tensor(compiled[i]["teacher_logits"]),
                                   torch.as_tensor(eager[i]["teacher_logits"]), rtol=0, atol=0)


def test_teacher_compile_follows_torch_compile_and_refusals(make_args):
    assert make_args().teacher_compile_options is None
    assert make_args(torch_compile=True, torch_compile_backend="aot_eager",
                     torch_compile_mode="max-autotune-no-cudagraphs").teacher_compile_options == {
        "backend": "aot_eager", "mode": "max-autotune-no-cudagraphs"}
    assert make_args(torch_compile=True, teacher_compile=False).teacher_compile_options is None
    assert make_args(teacher_compile_backend="eager").teacher_compile_options == {"backend": "eager", "mode": None}
    assert make_args(teacher_compile=True).teacher_compile_options == {"backend": "inductor", "mode": None}
    assert make_args(torch_compile=True, teacher_sharding="fsdp").teacher_compile_options is None  # stays eager
    with pytest.raises(ValueError, match="teacher_sharding='fsdp' is not supported"):
        make_args(teacher_compile=True, teacher_sharding="fsdp")
    with pytest.raises(ValueError, match="teacher_compile=False"):
        make_args(teacher_compile=False, teacher_compile_mode="reduce-overhead")


# --- channels_last --------------------------------------------------------------------------------------

def test_channels_last_gives_the_contiguous_losses(make_args, data):
    seen, losses = [], {}
    for channels_last in (False, True):
        student, teacher = tiny_timm(seed=1), tiny_hf_resnet(seed=2)
        student.layer1.register_forward_pre_hook(  # (1-channel images are both layouts: look at 32 channels)
            lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
        # (SGD: Adam's first steps are about sign(grad), which rounding near zero flips)
        losses[channels_last], *_, trainer = _train(make_args, data, student, teacher, steps=3, optim="sgd",
                                                    channels_last=channels_last)
        conv = trainer.teachers.models[0].resnet.encoder.stages[1].layers[0].layer[0].convolution.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert student.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        x = torch.randn(2, 3, 8, 8)
        assert trainer._memory_format(x).is_contiguous(memory_format=torch.channels_last) == channels_last
    assert seen == [False] * 3 + [True] * 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
