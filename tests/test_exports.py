"""Exports behave as trained: a student loaded its library's own way scores what the run's evaluation said.

Images of three shapes (square, wide, tall; the student's input is square): timm's
``create_model("local-dir:...")`` + ``resolve_model_data_config`` + ``create_transform`` and
transformers' ``AutoImageProcessor`` / ``pipeline`` must reproduce the trainer's evaluation on the
same PIL images, prediction for prediction. Class names come from the dataset's ``ClassLabel``.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_hf_resnet, tiny_spec, tiny_timm

from hf_distill import DistillationTrainer
from hf_distill.data import with_image_transform

SHAPES = {"square": (24, 24), "wide": (24, 48), "tall": (48, 24)}  # (height, width); the student takes 16x16
NAMES = [f"digit-{i}" for i in range(10)]


def _shaped(digits, split, n, shape, mode):
    """Digits enlarged to ``shape`` (aspect ratio changed), as PIL images in ``mode``, with named classes."""
    from datasets import ClassLabel, Dataset, Features, Image, NamedSplit

    part = digits[split].select(range(n))
    images = [img.convert(mode).resize(shape[::-1]) for img in part["image"]]
    features = Features({"image": Image(), "label": ClassLabel(names=NAMES)})
    return Dataset.from_dict({"image": images, "label": part["label"]}, features=features, split=NamedSplit(split))


def _train(student, digits, shape, mode, make_args):
    train = _shaped(digits, "train", 192, shape, mode)
    evaluation = _shaped(digits, "test", 48, shape, mode)
    trainer = DistillationTrainer(
        model=student, args=make_args(distill_method="supervised", max_steps=12, learning_rate=2e-2),
        train_dataset=with_image_transform(train, student, training=True),
        eval_dataset=with_image_transform(evaluation, student))
    trainer.train()
    metrics = trainer.evaluate()
    predictions = trainer.predict(trainer.eval_dataset).predictions.argmax(-1)
    return trainer, evaluation, metrics, predictions


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_timm_export_reproduces_the_run(shape, digits, make_args, tmp_path):
    import timm
    import timm.data

    student = tiny_timm(spec=tiny_spec())  # 1 channel, 16x16, mean/std 0.5
    trainer, evaluation, metrics, run_pred = _train(student, digits, SHAPES[shape], "L", make_args)
    out = tmp_path / "export"
    trainer.save_model(str(out))

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    config = timm.data.resolve_model_data_config(loaded)
    assert config["input_size"] == (1, 16, 16) and config["crop_mode"] == "squash" and config["crop_pct"] == 1.0
    transform = timm.data.create_transform(**config, is_training=False)
    with torch.no_grad():
        x = torch.stack([transform(img.convert("L")) for img in evaluation["image"]])
        pred = loaded(x).argmax(-1).numpy()
    labels = np.asarray(evaluation["label"])
    assert (pred == run_pred).all()
    assert float((pred == labels).mean()) == pytest.approx(metrics["eval_accuracy"], abs=1e-12)
    assert metrics["eval_accuracy"] > 0.2  # it learnt something: the predictions differ between images
    assert loaded.pretrained_cfg["label_names"] == NAMES  # from the dataset's ClassLabel, in Python


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_transformers_export_reproduces_the_run(shape, digits, make_args, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    student = tiny_hf_resnet(in_chans=3, spec=tiny_spec(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3))
    trainer, evaluation, metrics, run_pred = _train(student, digits, SHAPES[shape], "RGB", make_args)
    out = tmp_path / "export"
    trainer.save_model(str(out))

    processor = AutoImageProcessor.from_pretrained(out)
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    images = [img.convert("RGB") for img in evaluation["image"]]
    with torch.no_grad():
        pred = model(**processor(images=images, return_tensors="pt")).logits.argmax(-1).numpy()
    labels = np.asarray(evaluation["label"])
    assert (pred == run_pred).all()
    assert float((pred == labels).mean()) == pytest.approx(metrics["eval_accuracy"], abs=1e-12)
    assert metrics["eval_accuracy"] > 0.2

    classifier = pipeline("image-classification", model=str(out), device="cpu")
    answers = classifier(images, top_k=1)
    names = [a[0]["label"] for a in answers]
    assert set(names) <= set(NAMES)  # real class names, not LABEL_i
    assert [NAMES.index(n) for n in names] == list(pred)


def test_teacher_accuracy_is_measured_with_the_teachers_own_preprocessing(digits, make_args, tmp_path):
    """A transformers teacher (24x24, its own processor) distilled into a 16x16 timm student on wide images:
    the reported teacher accuracy is what ``pipeline`` gives; what it scored on the student's input is kept
    apart."""
    from transformers import pipeline

    from hf_distill import load_model
    from hf_distill.data import collate_images
    from hf_distill.models import call_model, display_name

    shape = SHAPES["wide"]
    first = tiny_hf_resnet(in_chans=3, spec=tiny_spec(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3, size=24))
    trainer, evaluation, _, _ = _train(first, digits, shape, "RGB", make_args)
    trainer.save_model(str(tmp_path / "teacher"))
    teacher = load_model(str(tmp_path / "teacher"))  # as a user would: the folder, with its processor

    classifier = pipeline("image-classification", model=str(tmp_path / "teacher"), device="cpu")
    images = [img.convert("RGB") for img in evaluation["image"]]
    by_pipeline = np.mean([NAMES.index(a[0]["label"]) == y
                           for a, y in zip(classifier(images, top_k=1), evaluation["label"])])

    student = tiny_timm(in_chans=3, spec=tiny_spec(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3))
    kd = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(),
                             eval_dataset=with_image_transform(evaluation, student))
    metrics = kd.evaluate()
    batch = collate_images([kd.eval_dataset[i] for i in range(len(evaluation))])
    with torch.no_grad():
        fed = call_model(teacher, kd.teachers.prepare_input(0, batch["pixel_values"])).argmax(-1)
    on_student_input = (fed == batch["labels"]).double().mean().item()
    assert metrics["eval_teacher_accuracy"] == pytest.approx(by_pipeline, abs=1e-12)
    assert metrics["eval_teacher_accuracy_student_input"] == pytest.approx(on_student_input, abs=1e-12)
    assert by_pipeline != on_student_input  # the two measurements differ here: the test tells them apart

    kd.save_model(str(tmp_path / "student"))  # the card says which is which
    card = (tmp_path / "student" / "README.md").read_text()
    name = display_name(teacher)
    assert f"| Teacher (`{name}`) | {by_pipeline * 100:.2f}% | `eval_teacher_accuracy` |" in card
    assert (f"| Teacher (`{name}`), fed the student's input | {on_student_input * 100:.2f}% | "
            "`eval_teacher_accuracy_student_input` |") in card
    assert "measured on the same raw images with its own preprocessing" in card
    assert "Evaluated on the `test` split (48 images); each image resized to 16x16" in card
