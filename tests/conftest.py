"""Shared fixtures: tiny models of each family and a small slice of real data (sklearn digits)."""

from __future__ import annotations

import os

# Tests never touch the network, and one thread keeps timings irrelevant and results stable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

torch.set_num_threads(1)

IMAGE_SIZE = 16
NUM_CLASSES = 10


def tiny_spec(mean=(0.5,), std=(0.5,), in_chans=1, size=IMAGE_SIZE):
    from hf_distill.models import InputSpec

    return InputSpec(mean=mean, std=std, image_size=(size, size), in_chans=in_chans)


def tiny_timm(name="test_resnet", seed=0, in_chans=1, spec=None, **kw):
    import timm

    from hf_distill.models import set_input_spec

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, in_chans=in_chans, **kw)
    set_input_spec(model, spec or tiny_spec(in_chans=in_chans))
    return model


def tiny_hf_resnet(seed=0, in_chans=1, spec=None, num_labels=NUM_CLASSES):
    from transformers import AutoModelForImageClassification, ResNetConfig

    from hf_distill.models import set_input_spec

    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(
        ResNetConfig(num_channels=in_chans, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                     layer_type="basic", num_labels=num_labels)
    )
    set_input_spec(model, spec or tiny_spec(in_chans=in_chans))
    return model


class PlainClassifier(torch.nn.Module):
    """A classifier from neither library: forward(x) -> logits."""

    def __init__(self, in_chans=1, num_classes=NUM_CLASSES, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(in_chans, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(8, num_classes),
        )

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="session")
def digits():
    from hf_distill.data import digits_dataset

    return digits_dataset()


@pytest.fixture(scope="session")
def digits_small(digits):
    """(train, eval) with 128 / 64 images, transformed for the tiny 16px grey spec."""
    from hf_distill.data import with_image_transform

    spec = tiny_spec()
    train = with_image_transform(digits["train"].select(range(128)), spec)
    evaluation = with_image_transform(digits["test"].select(range(64)), spec)
    return train, evaluation


@pytest.fixture
def make_args(tmp_path):
    """DistillationTrainingArguments for short deterministic CPU runs."""
    from hf_distill import DistillationTrainingArguments

    def make(**kw):
        base = dict(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, per_device_eval_batch_size=32,
            learning_rate=1e-2, max_steps=4, logging_steps=2, save_strategy="no", eval_strategy="no",
            report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )
        base.update(kw)
        return DistillationTrainingArguments(**base)

    return make
