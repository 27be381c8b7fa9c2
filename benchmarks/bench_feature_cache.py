"""Feature distillation from a feature cache vs live teachers vs the student alone: epoch time (CPU).

    python benchmarks/bench_feature_cache.py [--repeats 2]

Same student (timm resnet10t, 1 channel, 64 px), same data (the digits training split, 1437 images,
batch 64, no augmentation), one thread:

* ``student only``: the student and its adaptors trained on nothing but its own forward/backward
  (``distill_method="supervised"``: the cost floor of a step);
* ``feature, cached``: ``distill_method="feature"`` reading both teachers' features from a float16
  cache (summary + spatial), no teacher loaded;
* ``feature, live``: the same with the two teachers running every step: a ViT-S/16 (22 M parameters,
  64 px, 16 patch tokens) and a ResNet-50.

Epoch times are measured after one warm-up epoch, the configurations interleaved, ``--repeats``
times; the cache build time is reported too. Writes benchmarks/results/bench_feature_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SIZE, BATCH = 64, 64


def _models():
    import timm

    from hf_distill.models import InputSpec, set_input_spec

    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(SIZE, SIZE), in_chans=1)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=SIZE, in_chans=1)
    cnn = timm.create_model("resnet50", pretrained=False, num_classes=0, in_chans=1)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    for m in (vit, cnn, student):
        set_input_spec(m, spec)
    return spec, [vit, cnn], student


def _epoch_seconds(config: str, raw, cache_dir: str, epochs: int) -> list[float]:
    from transformers import TrainerCallback

    from hf_distill import DistillationTrainer, DistillationTrainingArguments
    from hf_distill.data import with_image_transform
    from hf_distill.teacher_cache import with_teacher_cache

    spec, teachers, student = _models()
    kw = {"supervised": {"distill_method": "supervised"},
          "cached": {"distill_method": "feature", "teacher_cache_dir": cache_dir},
          "live": {"distill_method": "feature"}}[config]
    args = DistillationTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
        eval_teacher=False, dataloader_num_workers=0, **kw)
    if config == "cached":
        data = with_teacher_cache(raw.remove_columns("label"), cache_dir, spec)
    else:
        data = with_image_transform(raw if config == "supervised" else raw.remove_columns("label"), spec,
                                    training=True, augmentation="none")
    marks = []

    class Clock(TrainerCallback):
        def on_epoch_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = DistillationTrainer(model=student, teacher_model=teachers if config == "live" else None, args=args,
                                  train_dataset=data, callbacks=[Clock()])
    trainer.train()
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    from hf_distill.data import digits_dataset
    from hf_distill.teacher_cache import build_teacher_cache

    raw = digits_dataset()["train"]
    cache_dir = tempfile.mkdtemp()
    spec, teachers, _ = _models()
    start = time.perf_counter()
    build_teacher_cache(teachers, raw.remove_columns("label"), spec, cache_dir, batch_size=BATCH, outputs="features")
    build_s = time.perf_counter() - start
    rows = []
    for repeat in range(a.repeats):
        for config in ("supervised", "cached", "live"):
            seconds = _epoch_seconds(config, raw, cache_dir, epochs=2)
            rows.append({"config": config, "repeat": repeat, "warmup_epoch_s": seconds[0], "epoch_s": seconds[1]})
            print(rows[-1], flush=True)
    mean = {c: sum(r["epoch_s"] for r in rows if r["config"] == c) / a.repeats for c in ("supervised", "cached", "live")}
    names = {"supervised": "student only (supervised)", "cached": "feature, from the cache",
             "live": "feature, live teachers (ViT-S/16 + ResNet-50)"}
    lines = ["# bench_feature_cache: feature distillation epoch time, cached vs live vs student only (CPU)", "",
             f"{platform.processor() or platform.machine()}, one thread; torch {torch.__version__}. Digits training "
             f"split (1437 images), {SIZE} px, batch {BATCH}, resnet10t student; epoch after one warm-up epoch, "
             f"configurations interleaved, {a.repeats} repeats. Generated by `python benchmarks/bench_feature_cache.py`.",
             "", "| configuration | epoch s (each repeat) | mean | vs student only |", "|---|---|---|---|"]
    for c in ("supervised", "cached", "live"):
        each = ", ".join(f"{r['epoch_s']:.2f}" for r in rows if r["config"] == c)
        lines.append(f"| {names[c]} | {each} | {mean[c]:.2f} | {mean[c] / mean['supervised']:.2f} |")
    lines += ["", f"Building the cache (both teachers, float16, one pass over the 1437 images): {build_s:.1f} s.",
              f"Ran beside: {os.environ.get('BENCH_BESIDE', 'nothing else (quiet machine)')}.", ""]
    text = "\n".join(lines)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_feature_cache.json"), "w") as f:
        json.dump({"rows": rows, "build_s": build_s, "mean_epoch_s": mean}, f, indent=2)
    with open(os.path.join(RESULTS, "bench_feature_cache.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
