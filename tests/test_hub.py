"""Hub loading and publishing through the real huggingface_hub / timm / transformers code.

A local fake Hub on 127.0.0.1 (tests/hub_server.py) answers the client; nothing leaves the machine.
"""

import os

import pytest
import torch
import yaml
from conftest import tiny_hf_resnet, tiny_spec, tiny_timm

from hf_distill import DistillationTrainer, load_model
from hf_distill.models import save_native, set_label_names
from hub_server import local_hub

TOKEN = "hf_" + "AbCdEf0123456789" * 2  # a fake token that must never be written anywhere


@pytest.fixture
def hub():
    with local_hub() as h:
        yield h


def _trained(make_args, train, student, **kw):
    args = make_args(push_to_hub=False, hub_token=TOKEN, **kw)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_hf_resnet(seed=9), args=args,
                                  train_dataset=train, eval_dataset=train)
    trainer.card_info.update(dataset="uoft-cs/cifar10", license="apache-2.0")
    trainer.train()
    trainer.evaluate()
    return trainer


def _assert_clean(hub, repo):
    for path, data in hub.repos[repo].items():
        assert TOKEN.encode() not in data, f"token leaked into {path}"
        assert not path.startswith(("distill_modules", "checkpoint-")), path


def test_push_timm_student_loads_with_timm_create_model(hub, digits_small, make_args, tmp_path):
    import timm

    train, _ = digits_small
    student = tiny_timm(seed=1)
    set_label_names(student, [f"d{i}" for i in range(10)])
    trainer = _trained(make_args, train, student, hub_model_id="org/timm-student")
    trainer.push_to_hub()
    files = set(hub.repos["org/timm-student"])
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) and f != "training_args.bin" for f in files)
    _assert_clean(hub, "org/timm-student")
    card = hub.repos["org/timm-student"]["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "timm" and "knowledge-distillation" in meta["tags"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
    reloaded = timm.create_model("hf-hub:org/timm-student", pretrained=True, cache_dir=str(tmp_path / "c")).eval()
    student.eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(student(x), reloaded(x))
    assert reloaded.pretrained_cfg["label_names"][2] == "d2"


def test_push_transformers_student_loads_with_auto_class_and_pipeline(hub, digits, make_args, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    from hf_distill.data import with_image_transform

    spec = tiny_spec(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3)
    train = with_image_transform(digits["train"].select(range(64)), spec)
    student = tiny_hf_resnet(seed=1, in_chans=3, spec=spec)
    set_label_names(student, [f"d{i}" for i in range(10)])
    args = make_args(hub_model_id="org/hf-student", hub_token=TOKEN)
    teacher = tiny_timm(seed=2, in_chans=3, spec=spec)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train)
    trainer.train()
    trainer.push_to_hub()
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(
        hub.repos["org/hf-student"])
    _assert_clean(hub, "org/hf-student")
    cache = str(tmp_path / "c")
    reloaded = AutoModelForImageClassification.from_pretrained("org/hf-student", cache_dir=cache).eval()
    student.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(student(pixel_values=x).logits, reloaded(pixel_values=x).logits)
    assert reloaded.config.id2label[4] == "d4"
    clf = pipeline("image-classification", model="org/hf-student", model_kwargs={"cache_dir": cache})
    assert clf(Image.new("RGB", (20, 20)))[0]["label"].startswith("d")


def test_failed_push_is_clear_and_leaves_the_output_intact(hub, digits_small, make_args):
    import timm
    from huggingface_hub.errors import HfHubHTTPError

    train, _ = digits_small
    trainer = _trained(make_args, train, tiny_timm(seed=1), hub_model_id="org/broken")
    hub.fail_writes, hub.fail_status = True, 403
    with pytest.raises(HfHubHTTPError, match="403"):
        trainer.push_to_hub()
    out = trainer.args.output_dir
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(out))
    timm.create_model(f"local-dir:{out}", pretrained=True)  # still a valid model folder


def _prefill_cache(hub, tmp_path):
    """Publish a timm and a transformers teacher, download them into a fresh cache."""
    from huggingface_hub import snapshot_download, upload_folder

    models = {"org/timm-teacher": tiny_timm(seed=5), "org/hf-teacher": tiny_hf_resnet(seed=6)}
    cache = tmp_path / "hf_cache"
    for repo, model in models.items():
        folder = tmp_path / repo.replace("/", "_")
        save_native(model, folder)
        hub.create(repo) if hasattr(hub, "create") else None
        from huggingface_hub import create_repo

        create_repo(repo, exist_ok=True)
        upload_folder(repo_id=repo, folder_path=folder)
        snapshot_download(repo, cache_dir=cache)
    return models, cache


def test_teachers_load_offline_from_a_prefilled_cache(digits_small, make_args, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with local_hub() as hub:
        models, cache = _prefill_cache(hub, tmp_path)
    # the hub is gone: offline mode, reading only the cache, through our normal loading path
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    x = torch.randn(2, 1, 16, 16)
    timm_teacher = load_model("hf-hub:org/timm-teacher").eval()
    hf_teacher = load_model("org/hf-teacher").eval()
    assert torch.equal(timm_teacher(x), models["org/timm-teacher"].eval()(x))
    assert torch.equal(hf_teacher(pixel_values=x).logits, models["org/hf-teacher"].eval()(pixel_values=x).logits)
    # the trainer loads teachers named in its arguments the same way
    train, _ = digits_small
    args = make_args(teacher_model_name_or_path=["hf-hub:org/timm-teacher"])
    trainer = DistillationTrainer(model=tiny_hf_resnet(), args=args, train_dataset=train)
    assert torch.equal(trainer.teachers.models[0](x), timm_teacher(x))
    # not cached + offline: a clear message, not a stack of HTTP retries
    from hf_distill.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 is set and it is not in the local cache"):
        load_model("org/never-downloaded")
