"""Teacher-output caches of backbone features (distill_method="feature"): built once, replayed exactly."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_spec, tiny_timm
from test_feature_distillation import SPEC, _cnn_teacher, _student, _vit_teacher

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images, with_image_transform
from hf_distill.models.features import backbone_features
from hf_distill.teacher_cache import TeacherCacheError, build_teacher_cache, load_teacher_cache, with_teacher_cache


@pytest.fixture(scope="module")
def raw(digits):
    return digits["train"].select(range(64)).remove_columns("label")  # unlabelled images


def _args(make_args, **kw):
    return make_args(**{"distill_method": "feature", "per_device_train_batch_size": 16, "max_steps": 4,
                        "logging_steps": 1, **kw})


def test_a_float32_feature_cache_trains_exactly_as_the_live_teachers(raw, make_args, tmp_path):
    """Two teachers (a ViT with registers and a CNN), both targets, standardisation on: the student and the
    adaptors trained from the cache, with no teacher loaded, equal those trained against the live teachers
    bit for bit (the cache was built at the training batch size, deterministic views)."""
    cache = build_teacher_cache([_vit_teacher(), _cnn_teacher()], raw, SPEC, tmp_path / "c", batch_size=16,
                                outputs="features", feature_dtype="float32")
    assert cache.outputs == "features" and cache.feature_shapes == [
        {"summary": [32], "spatial": [32, 8, 8]}, {"summary": [512], "spatial": [512, 1, 1]}]
    live = DistillationTrainer(model=_student(), teacher_model=[_vit_teacher(), _cnn_teacher()], args=_args(make_args),
                               train_dataset=with_image_transform(raw, SPEC, training=True, augmentation="none"))
    live.train()
    cached = DistillationTrainer(model=_student(), args=_args(make_args, teacher_cache_dir=str(tmp_path / "c")),
                                 train_dataset=with_teacher_cache(raw, tmp_path / "c", SPEC))
    assert len(cached.teachers) == 0 and cached.method.keys == live.method.keys == [
        "dinov2withregistersmodel", "resnet18"]
    cached.train()
    a, b = dict(live.model.named_parameters()), dict(cached.model.named_parameters())
    assert a.keys() == b.keys() and any(k.startswith("extras.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in dict(live.model.named_buffers()).items():  # the standardisation statistics too
        assert torch.equal(v, dict(cached.model.named_buffers())[k]), k
    logged = set().union(*(h for h in cached.state.log_history if "loss" in h))
    assert {"loss_summary_resnet18", "loss_spatial_dinov2withregistersmodel"} <= logged


def test_half_precision_and_a_pooled_grid(raw, tmp_path):
    teacher = _vit_teacher()
    cache = build_teacher_cache(teacher, raw, SPEC, tmp_path / "c", batch_size=16, outputs="features",
                                feature_grid=4)
    assert cache.feature_shapes == [{"summary": [32], "spatial": [32, 4, 4]}]
    info = json.loads((tmp_path / "c" / "cache_info.json").read_text())
    assert info["config"]["feature_dtype"] == "float16" and info["config"]["feature_grid"] == 4
    assert str(cache.data.features["spatial_0"].feature.dtype) == "float16"
    data = with_teacher_cache(raw, cache, SPEC)
    batch = collate_images([data[i] for i in range(16)])
    with torch.no_grad():
        summary, spatial = backbone_features(teacher, batch["pixel_values"])
    pooled = torch.nn.functional.adaptive_avg_pool2d(spatial, 4)
    for got, want in ((batch["teacher_features/0/summary"], summary), (batch["teacher_features/0/spatial"], pooled)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)  # float16 rounding
        assert not torch.equal(got, want)


def test_a_student_learns_the_pooled_grid_from_a_cache_with_labels_kept(digits, make_args, tmp_path):
    raw = digits["train"].select(range(32))  # labelled: the labels travel with the items, unused by the loss
    build_teacher_cache(_cnn_teacher(), raw, SPEC, tmp_path / "c", batch_size=16, outputs="features",
                        feature_targets=["summary"])
    data = with_teacher_cache(raw, tmp_path / "c", SPEC)
    assert data[0]["labels"] == raw[0]["label"] and set(data[0]) == {"pixel_values", "labels",
                                                                       "teacher_features/0/summary"}
    t = DistillationTrainer(model=_student(), args=_args(make_args, teacher_cache_dir=str(tmp_path / "c"),
                                                         feature_targets=["summary"], max_steps=2),
                            train_dataset=data)
    t.train()
    assert set(t.last_loss_terms) == {"loss_summary_resnet18"}


def test_what_a_feature_cache_refuses(digits, raw, make_args, tmp_path):
    build_teacher_cache(_cnn_teacher(), raw, SPEC, tmp_path / "f", batch_size=16, outputs="features",
                        feature_targets=["summary"])
    with pytest.raises(ValueError, match="holds \\['summary'\\], not \\['spatial'\\]"):
        DistillationTrainer(model=_student(), args=_args(make_args, teacher_cache_dir=str(tmp_path / "f")),
                            train_dataset=with_teacher_cache(raw, tmp_path / "f", SPEC))
    labelled = digits["train"].select(range(16))
    build_teacher_cache(tiny_timm(seed=2), labelled, tiny_spec(), tmp_path / "l", batch_size=16)
    with pytest.raises(ValueError, match="holds the teachers' logits, but distill_method='feature' learns their "
                                         "features"):
        DistillationTrainer(model=_student(), args=_args(make_args, teacher_cache_dir=str(tmp_path / "l")))
    with pytest.raises(ValueError, match="holds the teachers' features, but distill_method='kd' learns their logits"):
        DistillationTrainer(model=tiny_timm(seed=1, spec=SPEC), args=make_args(teacher_cache_dir=str(tmp_path / "f")))
    with pytest.raises(ValueError, match="top_k and mixup / CutMix apply to logits"):
        build_teacher_cache(_cnn_teacher(), raw, SPEC, tmp_path / "x", outputs="features", top_k=5)
    with pytest.raises(TeacherCacheError, match="outputs.*cache has 'features', given 'logits'"):
        load_teacher_cache(tmp_path / "f").check(outputs="logits")
    assert np.isfinite(load_teacher_cache(tmp_path / "f").data[0]["summary_0"]).all()
