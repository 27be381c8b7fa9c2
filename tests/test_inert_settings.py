"""Settings that cannot act as asked in this run are reported when the trainer is built: one line, with the fix."""

import logging

import datasets
import pytest
import torch
from conftest import tiny_hf_resnet, tiny_spec, tiny_timm

from hf_distill import DistillationTrainer
from hf_distill.data import with_image_transform
from hf_distill.methods import Progress

SPEC32 = tiny_spec(size=32)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("hf_distill")]


def test_dkd_warmup_longer_than_the_run(digits_small, make_args, caplog):
    train, _ = digits_small  # 128 images, batches of 16: 8 steps per epoch; max_steps=4 is half an epoch
    with caplog.at_level(logging.WARNING):
        t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=train,
                                args=make_args(distill_method="dkd"))
    lines = [w for w in _warnings(caplog) if "dkd_warmup_epochs" in w]
    assert lines == ["dkd_warmup_epochs=20 is longer than this run (0.5 epochs): the DKD term would end at 2% of its "
                     "weight; set dkd_warmup_epochs to 0.5 or less (0: no warm-up)"]
    # what the line claims: the ramp's value at the run's last step
    last = Progress(step=3, max_steps=4, epoch=0.375, num_epochs=0.5, steps_per_epoch=8)
    assert t.method.ramp(last) == pytest.approx(3 / (20 * 8)) and t.method.ramp(last) < 0.025

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=train,
                            args=make_args(distill_method="dkd", dkd_warmup_epochs=0.5))
    assert not [w for w in _warnings(caplog) if "dkd_warmup_epochs" in w]


def _feature_student():
    import timm

    from hf_distill.models import set_input_spec

    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=0, in_chans=1)  # a 1x1 map at 32x32
    set_input_spec(model, SPEC32)
    return model


def _vit_teacher():
    import transformers as tr

    from hf_distill.models import set_input_spec

    torch.manual_seed(2)
    model = tr.Dinov2Model(tr.Dinov2Config(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=16, num_channels=1))
    set_input_spec(model, SPEC32)  # a 4x4 grid of patches
    return model


def test_spatial_target_on_a_one_position_student_map(digits, make_args, caplog):
    from hf_distill.models.features import feature_shapes

    train = with_image_transform(digits["train"].select(range(32)).remove_columns("label"), SPEC32)
    student, teacher = _feature_student(), _vit_teacher()
    x = torch.zeros(2, 1, 32, 32)
    assert feature_shapes(student, x)[2] == (1, 1) and feature_shapes(teacher, x)[2] == (4, 4)
    with caplog.at_level(logging.WARNING):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                            args=make_args(distill_method="feature"))
    lines = [w for w in _warnings(caplog) if "spatial" in w]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "1x1 at its 32x32 input" in lines[0] and "`Dinov2Model` gives 4x4" in lines[0]
    assert "feature_targets=['summary']" in lines[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        DistillationTrainer(model=_feature_student(), teacher_model=_vit_teacher(), train_dataset=train,
                            args=make_args(distill_method="feature", feature_targets=["summary"]))
    assert not [w for w in _warnings(caplog) if "spatial" in w]


def test_feature_cache_without_teacher_or_knn_evaluates_nothing(digits, make_args, tmp_path, caplog):
    from hf_distill.teacher_cache import build_teacher_cache, with_teacher_cache

    raw = digits["train"].select(range(32)).remove_columns("label")
    build_teacher_cache(_vit_teacher(), raw, SPEC32, tmp_path / "c", batch_size=16, outputs="features",
                        feature_targets=["summary"])
    evaluation = with_image_transform(digits["test"].select(range(16)), SPEC32)
    args = make_args(distill_method="feature", feature_targets=["summary"], teacher_cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING):
        t = DistillationTrainer(model=_feature_student(), args=args, eval_dataset=evaluation,
                                train_dataset=with_teacher_cache(raw, tmp_path / "c", SPEC32))
    lines = [w for w in _warnings(caplog) if "nothing to evaluate" in w]
    assert len(lines) == 1 and "knn_train_dataset=" in lines[0] and "--knn_split" in lines[0]
    metrics = t.evaluate()  # what the line says: no measurement at all
    assert not [k for k in metrics if "cosine" in k or "knn" in k or "accuracy" in k]

    caplog.clear()
    memory = with_image_transform(digits["train"].select(range(40, 80)), SPEC32)
    with caplog.at_level(logging.WARNING):
        t = DistillationTrainer(model=_feature_student(), args=args, eval_dataset=evaluation,
                                knn_train_dataset=memory, train_dataset=with_teacher_cache(raw, tmp_path / "c", SPEC32))
    assert not [w for w in _warnings(caplog) if "nothing to evaluate" in w]
    assert "eval_knn_accuracy" in t.evaluate()


def test_class_names_after_a_python_run(digits, make_args, tmp_path):
    """No label_names given anywhere in Python: the student takes the training data's ClassLabel names, or
    the teacher's when the data has none."""
    from transformers import pipeline

    from hf_distill.models import label_names_of, set_label_names

    names = [f"n{i}" for i in range(10)]
    data = digits["train"].select(range(32)).cast_column(
        "label", datasets.ClassLabel(names=names))
    student = tiny_hf_resnet(seed=1, in_chans=3, spec=tiny_spec(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3))
    assert label_names_of(student) is None
    t = DistillationTrainer(model=student, train_dataset=with_image_transform(data, student, training=True),
                            args=make_args(distill_method="supervised", max_steps=1, output_dir=str(tmp_path / "o")))
    t.train()
    t.save_model()
    answers = pipeline("image-classification", model=str(tmp_path / "o"), device="cpu")(
        data[0]["image"].convert("RGB"), top_k=3)
    assert {a["label"] for a in answers} <= set(names)

    # unnamed data (plain integers), a named teacher: the teacher's names
    plain = digits["train"].select(range(32)).cast_column("label", datasets.Value("int64"))
    teacher = tiny_timm(seed=2)
    set_label_names(teacher, [f"t{i}" for i in range(10)])
    student = tiny_timm(seed=1)
    DistillationTrainer(model=student, teacher_model=teacher, train_dataset=with_image_transform(plain, student),
                        args=make_args(max_steps=1))
    assert label_names_of(student) == [f"t{i}" for i in range(10)]
