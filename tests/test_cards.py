"""Model cards written by real (short) runs of every distill_method, and of cached, mixed and BYOT-with-teacher
runs: the card parsed, every figure checked against the trainer's record and the models' parameter counts."""

import re

import pytest
import torch
import yaml
from conftest import tiny_hf_resnet, tiny_spec, tiny_timm
from huggingface_hub import ModelCard

from hf_distill import DistillationTrainer
from hf_distill.data import with_image_transform
from hf_distill.methods import METHODS
from hf_distill.models import count_parameters, display_name

SPEC32 = tiny_spec(size=32)
PAIR = "layer1:resnet.encoder.stages.1"  # timm student -> transformers teacher (tests/test_fitnets.py)


@pytest.fixture(scope="module")
def data(digits):
    def make(spec, n_train=32, n_eval=24, labelled=True):
        train = digits["train"].select(range(n_train))
        return (with_image_transform(train if labelled else train.remove_columns("label"), spec, training=True),
                with_image_transform(digits["test"].select(range(n_eval)), spec))
    return make


def _vit_backbone(seed=2):
    import transformers as tr

    from hf_distill.models import set_input_spec

    torch.manual_seed(seed)
    model = tr.Dinov2Model(tr.Dinov2Config(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=16, num_channels=1))
    set_input_spec(model, SPEC32)
    return model


def _run(make_args, data, tmp_path, method, student, teacher=None, spec=None, knn=False, labelled=True, **kw):
    train, evaluation = data(spec or tiny_spec(), labelled=labelled)
    extra = {"knn_train_dataset": data(spec or tiny_spec())[0]} if knn else {}  # labelled training images
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train, eval_dataset=evaluation,
                                  args=make_args(distill_method=method, max_steps=2, output_dir=str(tmp_path / "out"),
                                                 **kw), **extra)
    (tmp_path / "my-images").mkdir(exist_ok=True)
    trainer.card_info["dataset"] = str(tmp_path / "my-images")  # a local folder: never a dataset type
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    return trainer, (tmp_path / "out" / "README.md").read_text()


def _tables(section: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables of a section: (header cells, rows of cells); ``\\|`` inside a cell is kept."""
    tables, current = [], None
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = (cells, [])
            elif not set("".join(cells)) <= set("-:"):
                current[1].append(cells)
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _expected(kind: str, value: float) -> str:
    return f"{value * 100:.2f}%" if kind in ("accuracy", "knn", "agreement") else f"{value:.4f}"


def _check(trainer, text: str) -> dict:
    """Everything a card must get right whatever the method; returns the hyperparameter rows."""
    method = type(trainer.method)
    record = trainer.model_card_metrics()
    card = ModelCard(text)  # front matter parses and validates like the Hub client's
    meta = yaml.safe_load(text.split("---")[1])

    # the method as it declares itself
    assert method.title and f"| Method | [{method.title}]" in text or f"| Method | {method.title} |" in text
    assert trainer.method.description in text

    # results: one table per kind, every figure from the record, no accuracy header over another kind
    results = _section(text, "Results")
    shown = set()
    for header, rows in _tables(results):
        if header[-1] != "Metric":
            continue  # "Other evaluation metrics"
        for label, value, name in rows:
            name = name.strip("`")[len("eval_"):]
            kind = method.metric_kind(name)
            assert kind is not None and name in record, name
            assert value.strip("*") == _expected(kind, record[name]), (name, value, record[name])
            if "accuracy" in header[1].lower():
                assert kind in ("accuracy", "knn"), (header, name)
            shown.add(name)
    assert shown == {n for n in record if method.metric_kind(n)}  # every declared metric, and only those
    assert f"({len(trainer.eval_dataset)} images)" in results  # the evaluation set's size
    student, teacher = record.get("accuracy"), record.get("teacher_accuracy")
    if student is not None and teacher is not None:
        gap = (student - teacher) * 100
        assert f"{abs(gap):.2f} points {'above' if gap >= 0 else 'below'} the teacher" in results

    # size: parameter counts of the models themselves, the comparison read the right way round
    size = _section(text, "Size and speed")
    counts = [int(m.replace(",", "")) for m in re.findall(r"\(([\d,]+)\) \|", size)]
    assert counts[0] == count_parameters(trainer.student)
    teachers = list(trainer.teachers.models)
    assert counts[1:1 + len(teachers)] == [count_parameters(t) for t in teachers]
    if teachers:
        ratio = sum(map(count_parameters, teachers)) / count_parameters(trainer.student)
        if round(ratio, 2) == 1.0 or round(1 / ratio, 2) == 1.0:
            assert "the student has about as many parameters as the teacher" in size
        else:
            want = f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"
            assert f"the student has {want} parameters" in size
    assert not re.search(r"\b0\.\d+x (fewer|faster|more|slower)", size)
    timing = trainer._timing()
    assert f"| {timing['student_ms_per_image']:.3f} |" in size
    if "teacher_ms_per_image" in timing:
        speed = timing["teacher_ms_per_image"] / timing["student_ms_per_image"]
        if round(speed, 2) == 1.0 or round(1 / speed, 2) == 1.0:
            assert "about as fast as the teacher" in size
        else:
            assert (f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower") in size

    # the dataset: a local folder is no dataset type, its name is its last part
    if "model-index" in meta:
        dataset = meta["model-index"][0]["results"][0]["dataset"]
        assert dataset["type"] == "imagefolder" and dataset["name"] == "my-images"
    assert str(trainer.card_info["dataset"]) not in text

    # hyperparameters: the method's own, each shown once
    rows = {}
    if "### Distillation hyperparameters" in text:
        for name, value in _tables(text.split("### Distillation hyperparameters", 1)[1].split("\n## ", 1)[0])[0][1]:
            rows[name.strip("`")] = value
    assert set(trainer.method.hyperparameters()) <= set(rows)
    assert card.data.pipeline_tag in ("image-classification", "image-feature-extraction")
    return rows


def test_kd(make_args, data, tmp_path):
    teacher = tiny_hf_resnet(seed=2)
    trainer, text = _run(make_args, data, tmp_path, "kd", tiny_timm(seed=1), teacher, temperature=2.0, alpha=0.7)
    rows = _check(trainer, text)
    assert rows["temperature"] == "2" and rows["alpha"] == "0.7"
    name = display_name(teacher)
    assert f"| Teacher (`{name}`) |" in _section(text, "Results")
    assert f"| Teacher (`{name}`) |" in _section(text, "Size and speed")  # the teacher named one way


@pytest.mark.parametrize("method", ["dkd", "dist", "noisy_teacher"])
def test_logit_methods(method, make_args, data, tmp_path):
    kw = {"dkd_warmup_epochs": 0.0} if method == "dkd" else {}
    trainer, text = _run(make_args, data, tmp_path, method, tiny_timm(seed=1), tiny_timm(seed=2), **kw)
    rows = _check(trainer, text)
    if method == "dkd":
        assert rows["dkd_beta"] == "8" and rows["dkd_warmup_epochs"] == "0"
    elif method == "dist":
        assert rows["dist_weight"] == "2"
    else:
        assert rows["distill_loss"] == "mse" and rows["teacher_noise_std"] == "0.2"


def test_supervised(make_args, data, tmp_path):
    trainer, text = _run(make_args, data, tmp_path, "supervised", tiny_timm(seed=1))
    _check(trainer, text)
    assert "Teacher" not in _section(text, "Results")


def test_function_matching_card_shows_the_mixing(make_args, data, tmp_path):
    trainer, text = _run(make_args, data, tmp_path, "function_matching", tiny_timm(seed=1), tiny_timm(seed=2),
                         cutmix_alpha=1.0)
    rows = _check(trainer, text)
    assert rows["mixup_alpha"] == "1" and rows["cutmix_alpha"] == "1" and rows["mixup_switch_prob"] == "0.5"
    assert rows["train_augmentation"] == "none"


def test_kd_mixed(make_args, data, tmp_path):
    trainer, text = _run(make_args, data, tmp_path, "kd", tiny_timm(seed=1), tiny_timm(seed=2), mixup_alpha=0.4,
                         mixup_prob=0.5)
    rows = _check(trainer, text)
    assert rows["mixup_alpha"] == "0.4" and rows["mixup_prob"] == "0.5" and rows["cutmix_alpha"] == "0"


def test_fitnets(make_args, data, tmp_path):
    trainer, text = _run(make_args, data, tmp_path, "fitnets", tiny_timm(seed=1), tiny_hf_resnet(seed=2),
                         hint_layers=[PAIR], hint_epochs=0.1)
    rows = _check(trainer, text)
    assert rows["hint_layers"] == PAIR


def test_byot_alone_and_with_a_teacher(make_args, data, tmp_path):
    trainer, text = _run(make_args, data, tmp_path / "alone", "byot", tiny_timm(seed=1))
    rows = _check(trainer, text)
    assert "alpha" not in rows and "the network is its own teacher" in text
    assert any(n.startswith("exit") for n in trainer.model_card_metrics())

    trainer, text = _run(make_args, data, tmp_path / "teacher", "byot", tiny_timm(seed=1), tiny_hf_resnet(seed=2),
                         alpha=0.6)
    rows = _check(trainer, text)
    assert rows["alpha"] == "0.6" and rows["distill_loss"] == "kl" and rows["teacher_term"]
    assert "distilled from an external teacher" in text and "the network is its own teacher" not in text
    assert "teacher_accuracy" in trainer.model_card_metrics()


def test_sftn(make_args, data, tmp_path):
    trainer, text = _run(make_args, data, tmp_path, "sftn", tiny_timm("resnet18", seed=1, spec=SPEC32), spec=SPEC32,
                         sftn_student_model="test_resnet")
    _check(trainer, text)
    assert any(re.fullmatch(r"branch\d+_accuracy", n) for n in trainer.model_card_metrics())


def test_feature_distillation_card(make_args, data, tmp_path):
    def student():
        import timm

        from hf_distill.models import set_input_spec

        torch.manual_seed(1)
        model = timm.create_model("test_resnet", num_classes=0, in_chans=1)
        set_input_spec(model, SPEC32)
        return model

    teacher = _vit_backbone()
    trainer, text = _run(make_args, data, tmp_path, "feature", student(), teacher, spec=SPEC32, knn=True,
                         labelled=False)
    _check(trainer, text)
    record = trainer.model_card_metrics()
    assert {"feature_cosine", "knn_accuracy", "teacher_knn_accuracy"} <= set(record)
    results = _section(text, "Results")
    assert "| Model | Top-1 accuracy |" not in results  # no class accuracy in a label-free run
    # the teacher is named one way: its name, never the key its metrics are filed under (outside those names)
    key = trainer.method.keys[0]
    assert key != display_name(teacher) and key not in re.sub(r"`eval_\w+`", "", text)
    assert f"Teacher (`{display_name(teacher)}`)" in results


def test_kd_from_a_cache_names_the_cache(make_args, data, digits, tmp_path):
    from hf_distill.teacher_cache import build_teacher_cache, with_teacher_cache

    spec = tiny_spec()
    raw = digits["train"].select(range(32))
    build_teacher_cache(tiny_timm("resnet10t", seed=2), raw, spec, tmp_path / "soft-labels", batch_size=16)
    student = tiny_timm(seed=1)
    trainer = DistillationTrainer(
        model=student, train_dataset=with_teacher_cache(raw, str(tmp_path / "soft-labels"), spec),
        eval_dataset=with_image_transform(digits["test"].select(range(24)), student),
        args=make_args(max_steps=2, teacher_cache_dir=str(tmp_path / "soft-labels"), output_dir=str(tmp_path / "o")))
    (tmp_path / "my-images").mkdir()
    trainer.card_info["dataset"] = str(tmp_path / "my-images")
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    text = (tmp_path / "o" / "README.md").read_text()
    rows = _check(trainer, text)
    assert "`soft-labels`, built from `resnet10t`" in text and "| Teacher outputs | read from a cache" in text
    assert rows["train_augmentation"] == "none" and rows["teacher_outputs"].startswith("cached")
    assert "teacher_accuracy" not in trainer.model_card_metrics()  # no teacher loaded: nothing claimed for it


def test_every_method_has_a_card_test():
    tested = {"kd", "dkd", "dist", "noisy_teacher", "supervised", "function_matching", "fitnets", "byot", "sftn",
              "feature"}
    assert tested == set(METHODS)
    assert all(m.title and m.description for m in METHODS.values())


def test_evaluation_split_is_named_and_a_held_out_part_says_so(digits, make_args, tmp_path):
    from datasets import DatasetDict, NamedSplit

    from hf_distill.data import split_train_eval

    full = digits["train"].select(range(80))
    named = DatasetDict(train=type(full).from_dict(full.to_dict(), features=full.features, split=NamedSplit("train")))
    train, evaluation = split_train_eval(named, eval_fraction=0.25)  # no other split: a held-out part of train
    student = tiny_timm(seed=1)
    trainer = DistillationTrainer(model=student, args=make_args(distill_method="supervised",
                                                                output_dir=str(tmp_path / "o")),
                                  train_dataset=with_image_transform(train, student, training=True),
                                  eval_dataset=with_image_transform(evaluation, student))
    trainer.evaluate()
    trainer.save_model()
    text = (tmp_path / "o" / "README.md").read_text()
    assert "Evaluated on a held-out part of the `train` split (20 images), not trained on;" in text
