"""Speed and memory of hf_distill's training against the alternatives, one command, one machine:

    python benchmarks/bench_speed.py            # full run (~10-15 min on 2 busy cores), writes
                                                #   results/bench_speed.md and results/bench_speed.png
    python benchmarks/bench_speed.py --quick    # short smoke run (results/bench_speed_quick.*)

Same teacher / student pair (default timm ``resnet50`` -> ``mobilenetv3_small_050``, random init,
10 classes), same data, same optimizer (the AdamW the Trainer builds: lr 1e-3, betas, eps, fused,
weight decay 0), same torch threads (1) for every configuration. Timed configurations alternate
(order rotated every repetition) so they share the machine's load; every time is taken on two
clocks, wall (``perf_counter``) and CPU (``process_time``: CPU seconds of this process, far less
sensitive to the other jobs on a shared machine - the ratio to trust here).

1. **Teacher cache** (``hf_distill.teacher_cache``): the cache is built once (timed on its own),
   then three ``DistillationTrainer.train()`` runs of one epoch each over the same raw
   ``datasets`` images (same sampler seed, so the same batches):
   ``supervised`` (student alone, ``distill_method="supervised"``, no teacher), ``kd cached``
   (``teacher_model=None``, ``teacher_cache_dir=...``, ``with_teacher_cache`` data) and ``kd live``
   (the teacher runs at every step). Targets: cached / supervised <= 1.15; live / cached is the
   speed-up the cache buys. The time of an epoch runs from ``on_epoch_begin`` to ``on_epoch_end``
   (data loading included). The cached and live runs' final weights are compared bit for bit.
2. **Against what users would pick instead**, on pre-collated in-memory batches (no data
   pipeline cost for anyone), each library's own documented step (forward + loss + backward +
   gradient clipping to 1.0 + optimizer step), the steady state per step (step 1 of each epoch
   left out):

   * KD: ``DistillationTrainer`` (``kd``) vs ``timm.task.LogitDistillationTask``
     (``task(x, y)["loss"].backward()``) vs torchdistill's ``DistillationBox`` with ``KDLoss``
     (``forward_process`` + ``post_forward_process``, its ``train_one_epoch`` example loop);
   * feature hints on the pooled pre-logits (the only features timm's task uses):
     ``DistillationTrainer`` (``fitnets``, hint on the same two layers, kept in stage 2 with
     ``hint_weight``, ``alpha=0``) vs ``timm.task.FeatureDistillationTask``;
   * FitNets stage 1 on a middle layer: ``DistillationTrainer`` (``fitnets``, ``hint_epochs`` > 0)
     vs torchdistill's documented FitNets stage 1 (``sequential`` truncated models + ``ConvReg``,
     ``MSELoss(reduction="sum")``).

   The loss of the same first batch, from the same initial weights (regressors copied across),
   must agree to a relative 1e-5 once the definitions are aligned (listed in the report).
3. **Peak memory**: every configuration again in a fresh interpreter; peak RSS (``VmHWM``) minus
   the RSS after the imports (baseline). The cached-KD process never builds a teacher: the report
   lists the teacher parameters alive in each process (found by a ``gc`` scan for the teacher's
   class and parameter count).

Where hf_distill is slower than a competitor (CPU ratio > 1), a cProfile of its run is added.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import logging
import os
import pstats
import shutil
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

NAME = "bench_speed"
LR, TEMPERATURE, ALPHA = 1e-3, 4.0, 0.9
CLIP = 1.0  # max grad norm: the Trainer's default, set on every competitor too
HINT_WEIGHT = 1.0
LOSS_RTOL = 1e-5
CACHED_TARGET = 1.15

for _name in ("transformers", "hf_distill", "timm", "datasets", "torchdistill", "accelerate"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run: 32 px, 128 images, 2 repetitions")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--student", default="mobilenetv3_small_050")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="image sizes of the teacher-cache comparison (default 32 64; quick 32)")
    p.add_argument("--compare-size", type=int, default=None,
                   help="image size of the library comparison and memory runs (default 64; quick 32)")
    p.add_argument("--images", type=int, default=None, help="training images (default 384; quick 128)")
    p.add_argument("--raw-size", type=int, default=64, help="side of the stored raw images (resized to each size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per teacher-cache configuration (default 5; quick 2)")
    p.add_argument("--compare-reps", type=int, default=None,
                   help="timed repetitions per library in the comparison (default 7; quick 2)")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="steps per repetition in the library comparison, the first one untimed (default 7; quick 3)")
    p.add_argument("--hint-pair", default="blocks.1:layer2",
                   help="FitNets stage-1 hint `student.module:teacher.module` (a middle layer)")
    p.add_argument("--prelogit-pair", default="flatten:global_pool",
                   help="the modules whose outputs are timm's pooled pre-logits, `student:teacher`")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--malloc", choices=["steady", "default"], default="steady",
                   help="glibc allocator of the timing process (see _bench_common.tune_malloc)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    p.add_argument("--out", default=None, help="results name (default bench_speed; quick bench_speed_quick)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--raw-dir", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--teacher-class", help=argparse.SUPPRESS)
    p.add_argument("--teacher-params", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.sizes = a.sizes or ([32] if a.quick else [32, 64])
    a.compare_size = a.compare_size or (32 if a.quick else 64)
    a.images = a.images or (128 if a.quick else 384)
    a.reps = a.reps or (2 if a.quick else 5)
    a.compare_reps = a.compare_reps or (2 if a.quick else 7)
    a.compare_steps = a.compare_steps or (3 if a.quick else 7)
    a.out = a.out or (NAME + ("_quick" if a.quick else ""))
    return a


def pair_of(text: str) -> tuple[str, str]:
    s, t = text.split(":")
    return s.strip(), t.strip()


# =============================================================================================
# Data
# =============================================================================================
def make_raw_dataset(n: int, side: int, folder: str, seed: int = 0):
    """``n`` random RGB PNG images ``side`` x ``side`` with labels, saved to ``folder`` and loaded
    back (a memory-mapped ``datasets.Dataset`` whose fingerprint survives into child processes)."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image, load_from_disk
    from PIL import Image as PILImage

    if not os.path.exists(os.path.join(folder, "dataset_info.json")):
        rng = np.random.default_rng(seed)
        # smooth-ish images: a coarse random grid upsampled, plus noise (not pure noise, not flat)
        coarse = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
        images = []
        for i in range(n):
            img = PILImage.fromarray(coarse[i]).resize((side, side), PILImage.BILINEAR)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, size=(side, side, 3))
            images.append(PILImage.fromarray(arr.clip(0, 255).astype(np.uint8)))
        labels = rng.integers(0, C.NUM_CLASSES, size=n).tolist()
        features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(C.NUM_CLASSES)])})
        Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(folder)
    return load_from_disk(folder)


def spec_for(size: int):
    from hf_distill.models import InputSpec

    return InputSpec(mean=C.IMAGENET_MEAN, std=C.IMAGENET_STD, image_size=(size, size), in_chans=3)


class StackedBatches(C.BatchDataset):
    """Pre-collated batches as ``(pixel_values, labels)`` items (torchdistill's dataset convention)."""

    def __getitem__(self, i):
        b = self.batches[i]
        return b["pixel_values"], b["labels"]


# =============================================================================================
# Clocks
# =============================================================================================
def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    w, c = now()
    return w - t0[0], c - t0[1]


def step_clock_callback(marks: list):
    """A TrainerCallback appending ``now()`` at every ``on_step_end`` and at epoch begin / end."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            marks.append(("epoch_begin", now()))

        def on_step_end(self, args, state, control, **kw):
            marks.append(("step", now()))

        def on_epoch_end(self, args, state, control, **kw):
            marks.append(("epoch_end", now()))

    return _Clock()


def profiler_callback(prof: cProfile.Profile, window: str):
    """A TrainerCallback that profiles the timed window only: ``"epoch"`` (``on_epoch_begin`` to
    ``on_epoch_end``) or ``"steady"`` (end of step 1 to end of the last step)."""
    from transformers import TrainerCallback

    class _Prof(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            if window == "epoch":
                prof.enable()

        def on_epoch_end(self, args, state, control, **kw):
            if window == "epoch":
                prof.disable()

        def on_step_end(self, args, state, control, **kw):
            if window == "steady" and state.global_step == 1:
                prof.enable()
            if window == "steady" and state.global_step == state.max_steps:
                prof.disable()

    return _Prof()


def steady_per_step(step_marks: list[tuple[float, float]]) -> tuple[float, float]:
    """(wall, cpu) seconds per step from the end of step 1 to the end of the last step."""
    (w0, c0), (w1, c1) = step_marks[0], step_marks[-1]
    n = len(step_marks) - 1
    return (w1 - w0) / n, (c1 - c0) / n


# =============================================================================================
# Part 1: teacher cache vs supervised vs live teacher, through DistillationTrainer.train()
# =============================================================================================
P1_CONFIGS = ("supervised", "kd cached", "kd live")


def p1_trainer(config: str, student, teacher, raw, cache_dir, size, args, out_dir, marks=None):
    from hf_distill import DistillationTrainer
    from hf_distill.data import with_image_transform
    from hf_distill.teacher_cache import with_teacher_cache

    spec = spec_for(size)
    kw = dict(per_device_train_batch_size=args.batch_size, max_steps=-1, num_train_epochs=1,
              lr_scheduler_type="constant")
    if config == "supervised":
        targs = C.make_args(out_dir, LR, TEMPERATURE, ALPHA, distill_method="supervised", **kw)
        train, teacher_model = with_image_transform(raw, spec), None
    elif config == "kd cached":
        targs = C.make_args(out_dir, LR, TEMPERATURE, ALPHA, teacher_cache_dir=cache_dir, **kw)
        train, teacher_model = with_teacher_cache(raw, cache_dir, spec), None
    elif config == "kd live":
        targs = C.make_args(out_dir, LR, TEMPERATURE, ALPHA, **kw)
        train, teacher_model = with_image_transform(raw, spec), teacher
    else:
        raise ValueError(config)
    callbacks = [step_clock_callback(marks)] if marks is not None else None
    trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=targs, train_dataset=train,
                                  callbacks=callbacks)
    if config != "kd live":
        assert len(trainer.teachers) == 0, "no teacher may be held without a live teacher"
    return trainer


def build_cache(teacher, raw, size, cache_root, batch_size):
    from hf_distill.teacher_cache import build_teacher_cache

    cache_dir = os.path.join(cache_root, f"cache_{size}")
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = now()
    build_teacher_cache(teacher, raw, spec_for(size), cache_dir, batch_size=batch_size)
    return cache_dir, since(t0)


def data_cost(raw, cache_dir, size, batch_size, reps=3):
    """ms (wall, cpu) to produce one collated batch: the supervised dataset vs the cached one
    (dataset items fetched the way the Trainer's DataLoader fetches them, plus collate_images)."""
    from hf_distill.data import collate_images, with_image_transform
    from hf_distill.teacher_cache import with_teacher_cache

    spec = spec_for(size)
    sets = {"supervised": with_image_transform(raw, spec), "kd cached": with_teacher_cache(raw, cache_dir, spec)}
    idx = list(range(batch_size))
    out = {k: [] for k in sets}
    for _ in range(reps):
        for name, ds in sets.items():
            t0 = now()
            items = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
            collate_images(items)
            out[name].append(since(t0))
    return {k: (1e3 * statistics.median(w for w, _ in v), 1e3 * statistics.median(c for _, c in v))
            for k, v in out.items()}


def compare_cache(args, size, cache_root, out_dir):
    teacher, student = C.make_models(args.teacher, args.student, size)
    raw = make_raw_dataset(args.images, args.raw_size, os.path.join(cache_root, "raw"))
    cache_dir, build_time = build_cache(teacher, raw, size, cache_root, args.batch_size)
    print(f"[{size}] cache built in {build_time[0]:.2f} s wall / {build_time[1]:.2f} s cpu", flush=True)
    times = {c: {k: [] for k in P1_CONFIGS} for c in ("wall", "cpu")}
    totals = {k: [] for k in P1_CONFIGS}
    final = {}
    order = list(P1_CONFIGS)
    for rep in range(args.reps + 1):  # rep 0: untimed warm-up (and the cached == live check)
        for config in order:
            marks: list = []
            live_teacher = C.fresh(teacher) if config == "kd live" else None
            trainer = p1_trainer(config, C.fresh(student), live_teacher, raw, cache_dir, size, args, out_dir, marks)
            t0 = now()
            trainer.train()
            total = since(t0)
            begin = [m for k, m in marks if k == "epoch_begin"][0]
            end = [m for k, m in marks if k == "epoch_end"][-1]
            if rep == 0:
                final[config] = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}
            else:
                times["wall"][config].append(end[0] - begin[0])
                times["cpu"][config].append(end[1] - begin[1])
                totals[config].append(total)
            del trainer
            gc.collect()
        order = order[1:] + order[:1]
        if rep:
            print(f"[{size}] rep {rep}: " + ", ".join(f"{k} {times['cpu'][k][-1]:.2f}s cpu" for k in P1_CONFIGS),
                  flush=True)
    same = all(torch.equal(final["kd cached"][k], final["kd live"][k]) for k in final["kd live"])
    diff = max(float((final["kd cached"][k].float() - final["kd live"][k].float()).abs().max())
               for k in final["kd live"] if final["kd live"][k].is_floating_point())
    steps = -(-args.images // args.batch_size)
    res = {
        "size": size, "steps": steps, "build": build_time, "times": times,
        "train_total": {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                        for k, v in totals.items()},
        "bitwise": same, "max_abs_diff": diff, "data_cost": data_cost(raw, cache_dir, size, args.batch_size),
        "cache_dir": cache_dir, "raw_dir": os.path.join(cache_root, "raw"),
    }
    for clock in ("wall", "cpu"):
        t = times[clock]
        res[f"cached_over_supervised_{clock}"] = statistics.median(
            a / b for a, b in zip(t["kd cached"], t["supervised"]))
        res[f"live_over_cached_{clock}"] = statistics.median(a / b for a, b in zip(t["kd live"], t["kd cached"]))
        res[f"live_over_supervised_{clock}"] = statistics.median(
            a / b for a, b in zip(t["kd live"], t["supervised"]))
    return res


# =============================================================================================
# Part 2: runners of each library on pre-collated in-memory batches
# =============================================================================================
def optimizer_for(params):
    """The optimizer the Trainer builds (class, betas, eps, fused; weight decay 0 as its default)."""
    cls, kwargs = C.trainer_optimizer_kwargs()
    kwargs = dict(kwargs)
    kwargs.update(lr=LR, weight_decay=0.0)
    return cls([p for p in params if p.requires_grad], **kwargs)


class HFRunner:
    """``DistillationTrainer.train()`` over the batches (one batch per dataset item)."""

    library = "hf_distill"

    def __init__(self, student, teacher, batches, out_dir, **method_kw):
        self.marks: list = []
        self.trainer = C.make_trainer(student, teacher, batches, out_dir, LR, TEMPERATURE, method_kw.pop("alpha", ALPHA),
                                      max_steps=len(batches), lr_scheduler_type="constant", max_grad_norm=CLIP,
                                      **method_kw)
        self.trainer.add_callback(step_clock_callback(self.marks))

    def first_loss(self, batch) -> float:
        tr = self.trainer
        tr.model.train()
        return float(tr.compute_loss(tr.model, batch).detach())

    def run(self, prof=None):
        if prof is not None:
            self.trainer.add_callback(profiler_callback(prof, "steady"))
        self.trainer.train()
        return steady_per_step([m for k, m in self.marks if k == "step"])


class TimmRunner:
    """timm's task API: ``out = task(x, y); out["loss"].backward(); clip; optimizer.step(); zero_grad()``."""

    library = "timm"

    def __init__(self, student, teacher, batches, kind, alpha=ALPHA, distill_weight=None):
        from timm.task import FeatureDistillationTask, LogitDistillationTask

        if kind == "logit":
            # independent weights (1 - alpha, alpha): the same convex combination as hf_distill's kd
            self.task = LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(),
                                              task_loss_weight=1.0 - alpha, distill_loss_weight=alpha,
                                              temperature=TEMPERATURE, verbose=False)
        else:
            self.task = FeatureDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(),
                                                task_loss_weight=1.0, distill_loss_weight=distill_weight,
                                                verbose=False)
        self.batches = batches
        self.params = [p for p in self.task.trainable_module.parameters() if p.requires_grad]
        self.optimizer = optimizer_for(self.params)

    def first_loss(self, batch) -> float:
        self.task.train()
        return float(self.task(batch["pixel_values"], batch["labels"])["loss"].detach())

    def run(self, prof=None):
        self.task.train()
        marks = []
        for b in self.batches:
            out = self.task(b["pixel_values"], b["labels"])
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)  # timm train.py --clip-grad 1.0 (mode norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
            out["loss"].item()
            marks.append(now())
            if prof is not None and len(marks) == 1:
                prof.enable()
        if prof is not None:
            prof.disable()
        return steady_per_step(marks)


_TD_COLLATE = "hfd_bench_first_of"


def _td_register():
    from torchdistill.datasets.registry import COLLATE_FUNC_DICT, register_collate_func

    if _TD_COLLATE not in COLLATE_FUNC_DICT:
        register_collate_func(key=_TD_COLLATE)(C.first_of)


def prefix_modules(model: nn.Module, path: str) -> list[str]:
    """Module paths that run ``model`` up to and including ``path`` (one or two levels deep), in
    order: torchdistill's ``sequential`` list for a truncated model (timm ResNet / MobileNetV3 run
    their top-level children in order)."""
    head, _, tail = path.partition(".")
    out = []
    for name, child in model.named_children():
        if name != head:
            out.append(name)
            continue
        if not tail:
            out.append(name)
        else:
            for sub, _ in child.named_children():
                out.append(f"{name}.{sub}")
                if sub == tail:
                    break
        return out
    raise KeyError(path)


class TDRunner:
    """torchdistill's ``DistillationBox`` and its ``train_one_epoch`` example loop:
    ``pre_epoch_process``; per batch ``forward_process`` + ``post_forward_process`` (backward,
    clip to ``max_grad_norm``, ``optimizer.step()``, ``zero_grad()``); ``post_epoch_process``."""

    library = "torchdistill"

    def __init__(self, student, teacher, batches, kind, alpha=ALPHA, hint_pair=None, reg_channels=None):
        from torchdistill.core.distillation import get_distillation_box

        _td_register()
        cls, kwargs = C.trainer_optimizer_kwargs()
        opt_kwargs = dict(kwargs, lr=LR, weight_decay=0.0)
        loader = {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": None},
                  "kwargs": {"batch_size": 1, "num_workers": 0, "drop_last": False}, "collate_fn": _TD_COLLATE}
        optimizer = {"key": cls.__name__, "kwargs": opt_kwargs, "max_grad_norm": CLIP}
        if kind == "kd":
            config = {
                "num_epochs": 1, "train_data_loader": loader, "optimizer": optimizer,
                "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
                "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [],
                            "frozen_modules": [], "requires_grad": True},
                "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": {
                    "key": "KDLoss", "kwargs": {
                        "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                        "teacher_module_io": "output", "temperature": TEMPERATURE,
                        "alpha": 1.0 - alpha,  # torchdistill's alpha weighs the hard-label CE
                        "reduction": "batchmean"}}, "weight": 1.0}}}},
            }
        else:  # FitNets stage 1, as its sample config: truncated models, ConvReg, MSELoss(sum)
            s_layer, t_layer = hint_pair
            batch_size = batches[0]["labels"].shape[0]
            s_in, t_out = reg_channels
            config = {
                "num_epochs": 1, "train_data_loader": loader, "optimizer": optimizer,
                "teacher": {"forward_proc": "forward_batch_only", "sequential": prefix_modules(teacher, t_layer),
                            "forward_hook": {"input": [], "output": [t_layer]}, "requires_grad": False},
                "student": {"forward_proc": "forward_batch_only",
                            "adaptations": {"convreg": {"key": "ConvReg", "kwargs": {
                                "num_input_channels": s_in, "num_output_channels": t_out, "kernel_size": 1,
                                "stride": 1, "padding": 0, "uses_relu": False}}},
                            "sequential": prefix_modules(student, s_layer) + ["+convreg"], "frozen_modules": [],
                            "forward_hook": {"input": [], "output": ["+convreg"]}, "requires_grad": True},
                "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"hint": {
                    "criterion": {"key": "MSELoss", "kwargs": {"reduction": "sum"}},
                    "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                        "input": {"is_from_teacher": False, "module_path": "+convreg", "io": "output"},
                        "target": {"is_from_teacher": True, "module_path": t_layer, "io": "output"}}},
                    # hf_distill's hint is 1/2 * sum / batch: the same with weight 1 / (2 B)
                    "weight": 0.5 / batch_size}}}},
            }
        # torchdistill never switches the teacher to eval mode (BatchNorm would use batch
        # statistics): hand it over in eval mode, as the other libraries run theirs
        self.box = get_distillation_box(teacher.eval(), student, {"train": StackedBatches(batches)}, config,
                                        torch.device("cpu"), None, False, 1)

    def first_loss(self, batch) -> float:
        self.box.pre_epoch_process(epoch=0)
        return float(self.box.forward_process(batch["pixel_values"], batch["labels"], {}).detach())

    def run(self, prof=None):
        box = self.box
        box.pre_epoch_process(epoch=0)
        marks = []
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            loss.item()
            marks.append(now())
            if prof is not None and len(marks) == 1:
                prof.enable()
        if prof is not None:
            prof.disable()
        box.post_epoch_process()
        return steady_per_step(marks)


# --------------------------------------------------------------------------------------------- comparisons
def hint_channels(student, teacher, s_layer, t_layer, size):
    from hf_distill.models.taps import probe_features

    x = torch.zeros(2, 3, size, size)
    (s_shape, _), (t_shape, _) = probe_features(student, [s_layer], x)[s_layer], probe_features(teacher, [t_layer], x)[t_layer]
    return tuple(s_shape), tuple(t_shape)


def comparison_specs(args, size, student, teacher):
    """{name: (description, {runner name: factory(student, teacher, batches, out_dir)}, aligner)};
    ``student`` / ``teacher`` only give the feature shapes."""
    pre_s, pre_t = pair_of(args.prelogit_pair)
    hint_s, hint_t = pair_of(args.hint_pair)
    t_dim = hint_channels(student, teacher, pre_s, pre_t, size)[1][-1]
    s_shape, t_shape = hint_channels(student, teacher, hint_s, hint_t, size)
    feature_weight = HINT_WEIGHT * t_dim / 2.0  # timm: w * mean over B*D; hf: hint_weight * 1/2 * sum / B

    def copy_linear(src: nn.Linear, dst: nn.Linear):
        with torch.no_grad():
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)

    def align_prelogits(runners):
        hf_lin = runners["hf_distill"].trainer.model.extras["0"].proj
        copy_linear(hf_lin, runners["timm"].task.trainable_module.projection)

    def align_stage1(runners):
        hf_conv, hf_bn = runners["hf_distill"].trainer.model.extras["0"].proj
        reg = runners["torchdistill"].box.student_model.convreg
        with torch.no_grad():
            reg.conv.weight.copy_(hf_conv.weight)
            reg.conv.bias.zero_()
            reg.bn.load_state_dict(hf_bn.state_dict())

    return {
        "kd": (
            f"KD (logits), T={TEMPERATURE}, alpha={ALPHA}",
            {"hf_distill": lambda s, t, b, o: HFRunner(s, t, b, o),
             "timm": lambda s, t, b, o: TimmRunner(s, t, b, "logit"),
             "torchdistill": lambda s, t, b, o: TDRunner(s, t, b, "kd")},
            None,
        ),
        "prelogits": (
            f"feature hint on the pooled pre-logits (`{pre_s}` : `{pre_t}`, {t_dim}-d) + CE",
            {"hf_distill": lambda s, t, b, o: HFRunner(s, t, b, o, distill_method="fitnets",
                                                       hint_layers=[args.prelogit_pair], hint_epochs=0.0,
                                                       hint_weight=HINT_WEIGHT, alpha=0.0),
             "timm": lambda s, t, b, o: TimmRunner(s, t, b, "feature", distill_weight=feature_weight)},
            align_prelogits,
        ),
        "fitnets1": (
            f"FitNets stage 1 (hint only) on `{hint_s}` {list(s_shape[1:])} : `{hint_t}` {list(t_shape[1:])}",
            {"hf_distill": lambda s, t, b, o: HFRunner(s, t, b, o, distill_method="fitnets",
                                                       hint_layers=[args.hint_pair], hint_epochs=1000.0),
             "torchdistill": lambda s, t, b, o: TDRunner(s, t, b, "fitnets1", hint_pair=(hint_s, hint_t),
                                                         reg_channels=(s_shape[1], t_shape[1]))},
            align_stage1,
        ),
    }


def compare_libraries(args, size, out_dir):
    teacher, student = C.make_models(args.teacher, args.student, size)
    batches = C.make_batches(args.compare_steps, args.batch_size, size, seed=5)
    results = {}
    for key, (desc, factories, align) in comparison_specs(args, size, student, teacher).items():
        # same first batch, same initial weights (fresh copies), regressors copied across
        runners = {name: f(C.fresh(student), C.fresh(teacher), batches, out_dir) for name, f in factories.items()}
        if align is not None:
            align(runners)
        losses = {name: r.first_loss(batches[0]) for name, r in runners.items()}
        del runners
        names = list(factories)
        times = {c: {n: [] for n in names} for c in ("wall", "cpu")}
        order = list(names)
        for rep in range(args.compare_reps + 1):  # rep 0 untimed
            for name in order:
                runner = factories[name](C.fresh(student), C.fresh(teacher), batches, out_dir)
                w, c = runner.run()
                if rep:
                    times["wall"][name].append(w)
                    times["cpu"][name].append(c)
                del runner
                gc.collect()
            order = order[1:] + order[:1]
        summary = {clock: C.summarize(t, "hf_distill") for clock, t in times.items()}
        results[key] = {"desc": desc, "losses": losses, "times": times, "summary": summary}
        print(f"[{size}] {key}: losses {losses}; cpu ms/step "
              + ", ".join(f"{n} {summary['cpu'][n]['median_ms']:.1f}" for n in names), flush=True)
    return results


# =============================================================================================
# Cost of the pair
# =============================================================================================
def pair_cost(args, size):
    from torch.utils.flop_counter import FlopCounterMode

    teacher, student = C.make_models(args.teacher, args.student, size)
    teacher.eval()
    x = torch.randn(1, 3, size, size)
    flops = {}
    for name, m in (("teacher", teacher), ("student", student)):
        m.eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x)
        flops[name] = fc.get_total_flops()
    student.train()
    params = {"teacher": sum(p.numel() for p in teacher.parameters()),
              "student": sum(p.numel() for p in student.parameters())}
    batches = C.make_batches(3, args.batch_size, size, seed=7)
    s_eval = C.fresh(student).eval()
    opt = optimizer_for(student.parameters())

    class Fwd:
        def __init__(self, m):
            self.m = m

        def step(self, b):
            with torch.no_grad():
                self.m(b["pixel_values"])

    class Train:
        def step(self, b):
            loss = F.cross_entropy(student(b["pixel_values"]), b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    runners = {"teacher forward": Fwd(teacher), "student forward": Fwd(s_eval), "student train step": Train()}
    for r in runners.values():
        C.time_steps(r, batches, 1)
    t = C.alternating(runners, batches, reps=3 if not args.quick else 2, steps=2)
    ms = {k: 1e3 * statistics.median(v) for k, v in t["cpu"].items()}
    return {"flops": flops, "params": params, "ms": ms, "teacher_class": type(teacher).__name__}


def truncation_cost(args, size):
    """ms (cpu) of the teacher / student forward run to the stage-1 hint layer vs the whole model."""
    from torchdistill.models.util import redesign_model

    hint_s, hint_t = pair_of(args.hint_pair)
    teacher, student = C.make_models(args.teacher, args.student, size)
    teacher.eval()
    batches = C.make_batches(2, args.batch_size, size, seed=8)
    part_t = redesign_model(teacher, {"sequential": prefix_modules(teacher, hint_t)}, "teacher")
    part_s = redesign_model(student, {"sequential": prefix_modules(student, hint_s)}, "student")

    class Fwd:
        def __init__(self, m, grad=False):
            self.m, self.grad = m, grad

        def step(self, b):
            with torch.set_grad_enabled(self.grad):
                self.m(b["pixel_values"])

    runners = {"teacher whole": Fwd(teacher), f"teacher to {hint_t}": Fwd(part_t),
               "student whole (train fwd)": Fwd(student, True), f"student to {hint_s} (train fwd)": Fwd(part_s, True)}
    t = C.alternating(runners, batches, reps=2, steps=2)
    return {k: 1e3 * statistics.median(v) for k, v in t["cpu"].items()}


# =============================================================================================
# Profiles
# =============================================================================================
WANTED = ("hf_distill/", "transformers/trainer", "accelerate/", "torch/nn/utils/clip_grad", "torch/optim/",
          "torch/utils/data/", "timm/models/", "datasets/", "torchvision/transforms", "PIL/")


# Python frames of each library's own machinery (their own time excludes the torch work they call)
FRAMEWORK = {
    "hf_distill": ("hf_distill/", "transformers/trainer", "accelerate/", "torch/utils/data/"),
    "timm": ("timm/task/", "bench_speed.py", "torch/utils/data/"),
    "torchdistill": ("torchdistill/", "bench_speed.py", "torch/utils/data/"),
}


def profile(fn, top=25, framework=()):
    """``fn(prof)`` enables / disables the profiler around its timed window itself.
    Returns (profiled seconds, top rows by cumulative time, own seconds in ``framework`` files)."""
    prof = cProfile.Profile()
    fn(prof)
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    rows, own = [], 0.0
    for (file, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        if any(w in file for w in framework):
            own += tt
        if any(w in file for w in WANTED):
            short = file.split("site-packages/")[-1].split("/work/main/")[-1]
            rows.append((ct, tt, nc, f"`{short}:{line} {func}`"))
    rows.sort(reverse=True)
    return total, rows[:top], own


def profile_table(total, rows, steps, label):
    return [f"cProfile of {label}: {1e3 * total / steps:.0f} ms per step under the profiler (it inflates "
            "Python-heavy code; read the shares, not the absolute ms). Only the timed window is profiled; rows "
            "with calls/step < 1 run once per window.", "",
            C.md_table(["cumulative ms/step", "share of step", "own ms/step", "calls/step", "function"],
                       [(f"{1e3 * ct / steps:.1f}", f"{100 * ct / total:.0f}%", f"{1e3 * tt / steps:.2f}",
                         f"{nc / steps:.2f}", f) for ct, tt, nc, f in rows]), ""]


# =============================================================================================
# Memory children
# =============================================================================================
MEM_CONFIGS = ("supervised", "kd cached", "kd live", "hf_distill kd", "timm kd", "torchdistill kd",
               "hf_distill fitnets pre-logits", "timm feature", "hf_distill fitnets stage 1",
               "torchdistill fitnets stage 1")


def teacher_params_alive(cls_name: str, n_params: int) -> int:
    """Parameters of live modules of the teacher's class and size (the teacher and its copies)."""
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, nn.Module) and type(obj).__name__ == cls_name:
                n = sum(p.numel() for p in obj.parameters())
                if n == n_params:
                    total += n
        except ReferenceError:
            pass
    return total


def child(args):
    import datasets  # noqa: F401  (all imports before the baseline)
    import timm  # noqa: F401
    import torchdistill  # noqa: F401
    import transformers  # noqa: F401
    from timm.task import FeatureDistillationTask  # noqa: F401
    from torchdistill.core.distillation import get_distillation_box  # noqa: F401

    import hf_distill  # noqa: F401
    from hf_distill.teacher_cache import with_teacher_cache  # noqa: F401

    size, name = args.child_size, args.child
    out_dir = C.tmpdir("hfd_bench_speed_mem_")
    gc.collect()
    baseline = C.rss_now_mb()
    if name in P1_CONFIGS:
        from datasets import load_from_disk

        raw = load_from_disk(args.raw_dir)
        teacher = None
        if name == "kd live":
            teacher, student = C.make_models(args.teacher, args.student, size)
        else:  # never build the teacher: a cached run must not need it
            import timm as _timm

            from hf_distill.models import InputSpec, set_input_spec

            torch.manual_seed(1)
            student = _timm.create_model(args.student, pretrained=False, num_classes=C.NUM_CLASSES)
            set_input_spec(student, InputSpec(mean=C.IMAGENET_MEAN, std=C.IMAGENET_STD, image_size=(size, size)))
        trainer = p1_trainer(name, student, teacher, raw, args.cache_dir, size, args, out_dir)
        del teacher, student
        before = C.rss_now_mb()
        trainer.train()
        held = teacher_params_alive(args.teacher_class, args.teacher_params)
        n_teachers = len(trainer.teachers)
    else:
        teacher, student = C.make_models(args.teacher, args.student, size)
        batches = C.make_batches(args.compare_steps, args.batch_size, size, seed=5)
        lib_key = {"hf_distill kd": ("kd", "hf_distill"), "timm kd": ("kd", "timm"),
                   "torchdistill kd": ("kd", "torchdistill"),
                   "hf_distill fitnets pre-logits": ("prelogits", "hf_distill"),
                   "timm feature": ("prelogits", "timm"), "hf_distill fitnets stage 1": ("fitnets1", "hf_distill"),
                   "torchdistill fitnets stage 1": ("fitnets1", "torchdistill")}[name]
        factory = comparison_specs(args, size, student, teacher)[lib_key[0]][1][lib_key[1]]
        gc.collect()
        runner = factory(student, teacher, batches, out_dir)
        del teacher, student
        before = C.rss_now_mb()
        runner.run()
        held = teacher_params_alive(args.teacher_class, args.teacher_params)
        n_teachers = 1
    import resource

    print(json.dumps({"baseline_mb": baseline, "before_mb": before, "peak_mb": C.peak_rss_mb(),
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "teacher_params_alive": held, "teachers_in_trainer": n_teachers}))


def run_children(args, cost, p1_paths):
    out = {}
    size = args.compare_size
    for name in MEM_CONFIGS:
        child_args = ["--child", name, "--child-size", str(size), "--threads", str(args.threads),
                      "--teacher", args.teacher, "--student", args.student, "--batch-size", str(args.batch_size),
                      "--images", str(args.images), "--compare-steps", str(args.compare_steps),
                      "--raw-dir", p1_paths["raw_dir"], "--cache-dir", p1_paths["cache_dir"],
                      "--teacher-class", cost["teacher_class"], "--teacher-params", str(cost["params"]["teacher"]),
                      "--hint-pair", args.hint_pair, "--prelogit-pair", args.prelogit_pair,
                      "--raw-size", str(args.raw_size)]
        out[name] = C.child_memory(os.path.abspath(__file__), child_args)
        print(f"memory {name}: {out[name]}", flush=True)
    return out


# =============================================================================================
# Plot
# =============================================================================================
def plot(path, p1, p2, mem, size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if mem else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, 4.6))
    colors = {"supervised": "#8c8c8c", "kd cached": "#2a9d8f", "kd live": "#e76f51",
              "hf_distill": "#2a9d8f", "timm": "#457b9d", "torchdistill": "#e9c46a"}
    ax = axes[0]
    width = 0.26
    for i, config in enumerate(P1_CONFIGS):
        xs = [j + (i - 1) * width for j in range(len(p1))]
        ys = [statistics.median(r["times"]["cpu"][config]) for r in p1]
        bars = ax.bar(xs, ys, width, label=config, color=colors[config])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(p1)), [f"{r['size']} px ({r['steps']} steps)" for r in p1])
    ax.set_ylabel("CPU s per epoch (median)")
    ax.set_title("1. DistillationTrainer.train(): one epoch")
    ax.legend(fontsize=8)

    ax = axes[1]
    keys = list(p2)
    libs = ["hf_distill", "timm", "torchdistill"]
    for i, lib in enumerate(libs):
        xs, ys = [], []
        for j, k in enumerate(keys):
            if lib in p2[k]["summary"]["cpu"]:
                xs.append(j + (i - 1) * width)
                ys.append(p2[k]["summary"]["cpu"][lib]["median_ms"])
        bars = ax.bar(xs, ys, width, label=lib, color=colors[lib])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), ["KD", "hint @ pre-logits", "FitNets stage 1"])
    ax.set_ylabel("CPU ms per step (median)")
    ax.set_title(f"2. vs timm / torchdistill ({size} px)")
    ax.legend(fontsize=8)

    if mem:
        ax = axes[2]
        names = list(mem)
        ys = [mem[n]["peak_mb"] - mem[n]["baseline_mb"] for n in names]
        cols = [colors.get(n, colors.get(n.split(" ")[0], "#999999")) for n in names]
        bars = ax.barh(range(len(names)), ys, color=cols)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("peak RSS - baseline (MiB)")
        ax.set_title(f"3. peak memory, fresh process ({size} px)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =============================================================================================
# Main
# =============================================================================================
def git_commit() -> str:
    import subprocess

    root = os.path.dirname(C.HERE)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "hf_distill"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{' + uncommitted changes in hf_distill/' if dirty else ''}" if sha else "unknown"


def package_fingerprint() -> str:
    """A hash of the hf_distill sources, to detect edits made while the benchmark runs (child processes
    and later parts import the files as they are then)."""
    import hashlib

    import hf_distill

    root = os.path.dirname(hf_distill.__file__)
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as fh:
                    h.update(name.encode() + fh.read())
    return h.hexdigest()[:12]


def fmt_pair(wc):
    return f"{wc[0]:.2f} / {wc[1]:.2f}"


def main(argv=None):
    args = parse(argv)
    malloc = C.prepare_process(args)
    if args.child:
        return child(args)
    t_start = time.perf_counter()
    work = C.tmpdir("hfd_bench_speed_")
    out_dir = os.path.join(work, "out")
    import datasets
    import torchdistill

    fingerprint, commit = package_fingerprint(), git_commit()
    info = C.machine_rows(args.threads, malloc) + [("datasets", datasets.__version__),
                                                   ("torchdistill", torchdistill.__version__),
                                                   ("hf_distill commit", commit)]
    cost = pair_cost(args, args.compare_size)
    print("pair cost:", cost, flush=True)

    # ---------------------------------------------------------------- 1. teacher cache
    p1 = []
    for size in args.sizes:
        p1.append(compare_cache(args, size, work, out_dir))
    p1_paths = next((r for r in p1 if r["size"] == args.compare_size), None)
    if p1_paths is None:  # the memory runs need a cache at the compare size
        teacher, _ = C.make_models(args.teacher, args.student, args.compare_size)
        raw = make_raw_dataset(args.images, args.raw_size, os.path.join(work, "raw"))
        cache_dir, _ = build_cache(teacher, raw, args.compare_size, work, args.batch_size)
        p1_paths = {"cache_dir": cache_dir, "raw_dir": os.path.join(work, "raw")}

    # ---------------------------------------------------------------- 2. libraries
    p2 = compare_libraries(args, args.compare_size, out_dir)

    # ---------------------------------------------------------------- 3. memory
    mem = {} if args.no_memory else run_children(args, cost, p1_paths)

    # ---------------------------------------------------------------- report
    fl_t, fl_s = cost["flops"]["teacher"], cost["flops"]["student"]
    ms = cost["ms"]
    cs = args.compare_size
    md = [f"# {args.out}: hf_distill training speed and memory vs supervised, live teacher, timm and torchdistill", "",
          f"Command: `python benchmarks/{NAME}.py{''.join(' ' + a for a in (argv if argv is not None else sys.argv[1:]))}`", "",
          C.md_table(["machine", "value"], info), "",
          f"Pair: teacher `{args.teacher}` ({cost['params']['teacher'] / 1e6:.2f} M params) -> student `{args.student}` "
          f"({cost['params']['student'] / 1e6:.2f} M params), timm, random init, {C.NUM_CLASSES} classes, RGB, fp32, CPU; "
          f"batch {args.batch_size}; optimizer (every library) `{C.trainer_optimizer_kwargs()[0].__name__}` "
          f"lr {LR}, {C.trainer_optimizer_kwargs()[1]}, weight decay 0; gradient clipping to {CLIP} (Trainer default) "
          f"everywhere; constant lr; KD T={TEMPERATURE}, alpha={ALPHA} (weight of the soft term).", "",
          "## Cost of the pair", "",
          C.md_table(["", "teacher", "student", "teacher / student"], [
              (f"forward GFLOPs per image at {cs} px (`torch.utils.flop_counter`)", f"{fl_t / 1e9:.4f}",
               f"{fl_s / 1e9:.4f}", f"**{fl_t / fl_s:.0f}x**"),
              (f"forward, batch {args.batch_size}, eval, no grad (CPU ms)", f"{ms['teacher forward']:.1f}",
               f"{ms['student forward']:.1f}", f"**{ms['teacher forward'] / ms['student forward']:.1f}x**"),
              ("teacher forward vs student training step (fwd + bwd + AdamW) (CPU ms)", f"{ms['teacher forward']:.1f}",
               f"{ms['student train step']:.1f}", f"{ms['teacher forward'] / ms['student train step']:.2f}x"),
          ]), "",
          "A live-teacher KD step costs a student training step plus a teacher forward, so the cache's "
          "speed-up is bounded by about 1 + (teacher forward / student step).", ""]

    # part 1
    rows, data_rows, build_rows = [], [], []
    for r in p1:
        t = r["times"]
        for config in P1_CONFIGS:
            wall, cpu = statistics.median(t["wall"][config]), statistics.median(t["cpu"][config])
            ratio_c = {"supervised": "1", "kd cached": f"**{r['cached_over_supervised_cpu']:.3f}**",
                       "kd live": f"{r['live_over_supervised_cpu']:.3f}"}[config]
            ratio_w = {"supervised": "1", "kd cached": f"{r['cached_over_supervised_wall']:.3f}",
                       "kd live": f"{r['live_over_supervised_wall']:.3f}"}[config]
            rows.append((f"{r['size']} px", config, f"{cpu:.2f}", f"{wall:.2f}", ratio_c, ratio_w,
                         " ".join(f"{v:.2f}" for v in t["cpu"][config]), fmt_pair(r["train_total"][config])))
        dc = r["data_cost"]
        data_rows.append((f"{r['size']} px", f"{dc['supervised'][1]:.1f}", f"{dc['kd cached'][1]:.1f}",
                          f"{dc['kd cached'][1] - dc['supervised'][1]:+.1f}"))
        live_teacher = statistics.median(a - b for a, b in zip(t["cpu"]["kd live"], t["cpu"]["kd cached"]))
        build_rows.append((f"{r['size']} px", args.images, fmt_pair(r["build"]), f"{live_teacher:.2f}",
                           f"**{r['live_over_cached_cpu']:.2f}x**", f"{r['live_over_cached_wall']:.2f}x",
                           "yes" if r["bitwise"] else f"no (max abs diff {r['max_abs_diff']:.1e})"))
    md += ["## 1. Teacher cache: one epoch through `DistillationTrainer.train()`", "",
           f"{args.images} random RGB images ({args.raw_size} px PNG in a `datasets.Dataset`, resized to the "
           f"student's size), batch {args.batch_size}, one epoch per `train()`, the same sampler seed for all three, "
           f"`dataloader_num_workers=0`; {args.reps} repetitions after an untimed one, configuration order rotated "
           "every repetition. Epoch = `on_epoch_begin` to `on_epoch_end` (data loading, forward, backward, "
           "clipping, optimizer). Ratios: median over repetitions of the per-repetition ratio.", "",
           "Teacher cache build (`build_teacher_cache`, `augmentation=\"none\"`, build batch = training batch), "
           "timed on its own, and what it saves:", "",
           C.md_table(["image", "images", "cache build s (wall / cpu)", "teacher CPU s per live epoch (live - cached)",
                       "speed-up live / cached (cpu)", "(wall)", "cached-KD student == live-KD student, bitwise"],
                      build_rows), "",
           C.md_table(["image", "configuration", "CPU s / epoch (median)", "wall s / epoch", "/ supervised (cpu)",
                       "/ supervised (wall)", "per-repetition CPU s", "whole train() s (wall / cpu)"], rows), "",
           f"Target: kd cached / supervised <= {CACHED_TARGET} (CPU). Data cost per batch (CPU ms to fetch "
           f"{args.batch_size} items as the DataLoader does - `__getitems__` where the dataset has it - and "
           "collate them):", "",
           C.md_table(["image", "supervised dataset ms/batch", "cached dataset ms/batch", "difference"], data_rows), ""]

    # part 2
    from hf_distill.teachers import Teachers

    from hf_distill.models.taps import FeatureTaps

    teacher_stage1 = ("its teacher stops after the last hint layer (`Teachers.features_only`)"
                      if hasattr(Teachers, "features_only") else "it runs the whole teacher")
    student_stage1 = ("stops the student after its guided layer (`FeatureTaps.run_until_complete`)"
                      if hasattr(FeatureTaps, "run_until_complete") else "runs the whole student")
    def_notes = [
        "* **timm `LogitDistillationTask`**: `task_loss_weight * CE + distill_loss_weight * T^2 * KL(batchmean, "
        "log-target)`; with only `task_loss_weight` given, `distill = 1 - task`; with neither, both are 1 (a sum, "
        f"not hf_distill's convex combination). Aligned: `task_loss_weight={1 - ALPHA:.1f}`, "
        f"`distill_loss_weight={ALPHA}`, explicit `criterion=nn.CrossEntropyLoss()` (timm's default criterion "
        "is built from `criterion_kwargs`).",
        "* **torchdistill `KDLoss`**: `alpha * CE + (1 - alpha) * T^2 * KL(batchmean)` - its `alpha` weighs the hard "
        f"labels, so `alpha={1 - ALPHA:.1f}` here; the KL target is `softmax` probabilities (hf_distill and timm "
        "use log-probabilities, `log_target=True`): same value to float rounding. The T^2 factor is applied only "
        "when `alpha` > 0 and targets are given. torchdistill never puts the teacher in eval mode (its example "
        "script builds it in train mode, so BatchNorm would normalise with batch statistics and update its "
        "running stats); it is handed `teacher.eval()` here.",
        "* **timm `FeatureDistillationTask`**: `task_loss_weight * CE + distill_loss_weight * mse_loss(proj(s), t)` "
        "with `mse_loss` the mean over batch *and* features, on the pooled pre-logits only "
        "(`forward_head(pre_logits=True)`), projection `nn.Linear`. hf_distill's hint is `1/2 * sum over features, "
        "mean over batch`, so `distill_loss_weight = hint_weight * D / 2` (D = teacher feature size); hf_distill "
        "runs `fitnets` in stage 2 with `hint_weight` and `alpha=0` (CE + hint; its KD term is computed with weight 0). "
        "The projection weights are copied from hf_distill's regressor (`nn.Linear`, same shape). timm's trainable "
        "module runs the student's head twice per step (`forward_head` for logits and again for pre-logits).",
        "* **torchdistill FitNets (stage 1)**: its sample config truncates both models at the hint layer "
        "(`sequential`), regresses with `ConvReg` (1x1 conv *with* bias + BN, ReLU optional) and sums the squared "
        "error over the whole batch (`MSELoss(reduction='sum')`). Aligned: `uses_relu=False`, the conv bias "
        "zeroed, the conv / BN weights copied from hf_distill's regressor (1x1 conv without bias + BN), "
        "term weight `1 / (2 B)`. hf_distill's stage 1 taps the layers with forward hooks and "
        f"{student_stage1}; {teacher_stage1}.",
    ]
    loss_rows, time_rows, verdicts = [], [], []
    for key, r in p2.items():
        ref = r["losses"]["hf_distill"]
        for lib, v in r["losses"].items():
            rel = abs(v - ref) / max(abs(ref), 1e-12)
            loss_rows.append((r["desc"], lib, f"{v:.6f}", f"{rel:.1e}",
                              "yes" if rel <= LOSS_RTOL else "**NO**"))
        for clock in ("cpu", "wall"):
            s = r["summary"][clock]
            for lib, v in s.items():
                time_rows.append((r["desc"] if clock == "cpu" and lib == "hf_distill" else "", clock, lib,
                                  f"{v['median_ms']:.1f}", f"{v['min_ms']:.1f}",
                                  "1" if lib == "hf_distill" else f"{1 / v['median_paired_ratio']:.3f}",
                                  "" if lib == "hf_distill" else " ".join(f"{1 / x:.3f}" for x in v["paired_ratios"])))
        for lib, v in r["summary"]["cpu"].items():
            if lib != "hf_distill":
                verdicts.append((key, r["desc"], lib, 1 / v["median_paired_ratio"],
                                 1 / r["summary"]["wall"][lib]["median_paired_ratio"]))
    md += [f"## 2. Against timm's task API and torchdistill ({cs} px, same steps)", "",
           f"{args.compare_steps} pre-collated in-memory batches of {args.batch_size} (the same for every library); "
           "hf_distill runs `trainer.train()` on them (dataset items = whole batches); timm iterates them; "
           "torchdistill reads them through its own DataLoader (its `train_data_loader` config, a pass-through "
           "collate registered with `register_collate_func`). Each repetition builds every runner afresh from the "
           f"same weights and runs one epoch; per-step time from the end of step 1 to the end of the last step; "
           f"{args.compare_reps} repetitions after an untimed one, order rotated. Ratio = hf_distill / other "
           "(< 1: hf_distill faster), median of per-repetition ratios.", "",
           "### Same loss on the same first batch", "",
           "Definitions aligned as follows:", "", *def_notes, "",
           C.md_table(["comparison", "library", "loss, batch 1", "rel. diff to hf_distill", f"<= {LOSS_RTOL}"],
                      loss_rows), "",
           "### Time per step", "",
           C.md_table(["comparison", "clock", "library", "ms/step (median)", "min ms", "hf_distill / this (paired)",
                       "per-repetition"], time_rows), ""]

    slower = [v for v in verdicts if v[3] > 1.0]
    if "fitnets1" in p2:
        trunc = truncation_cost(args, cs)
        md += ["Where FitNets stage-1 time goes: forward cost (CPU ms per batch) of the whole models vs the models "
               "cut at the hint layers (what torchdistill's `sequential` runs):", "",
               C.md_table(["forward", "CPU ms"], [(k, f"{v:.1f}") for k, v in trunc.items()]), ""]

    # profiles where hf_distill is slower
    if slower:
        teacher, student = C.make_models(args.teacher, args.student, cs)
        batches = C.make_batches(args.compare_steps, args.batch_size, cs, seed=6)
        specs = comparison_specs(args, cs, student, teacher)
        for key in dict.fromkeys(k for k, *_ in slower):
            desc, factories, _ = specs[key]
            own_rows, hf_prof = [], None
            for lib, factory in factories.items():
                runner = factory(C.fresh(student), C.fresh(teacher), batches, out_dir)
                total, rows_p, own = profile(runner.run, framework=FRAMEWORK[lib])
                n = args.compare_steps - 1  # the profiled window: end of step 1 to the end
                own_rows.append((lib, f"{1e3 * own / n:.2f}", f"{1e3 * total / n:.0f}", f"{100 * own / total:.2f}%",
                                 ", ".join(f"`{w}`" for w in FRAMEWORK[lib])))
                if lib == "hf_distill":
                    hf_prof = (total, rows_p)
                del runner
            md += [f"### Profile: {desc}", "",
                   "Own time (excluding the torch work they call) of each library's Python machinery per step, "
                   "under cProfile, over the timed window (end of step 1 to the end of the epoch):", "",
                   C.md_table(["library", "own ms/step", "profiled ms/step", "share", "frames counted"], own_rows), ""]
            md += profile_table(*hf_prof, args.compare_steps - 1, "hf_distill `trainer.train()`, steps 2..n")
    for r in p1:
        if r["cached_over_supervised_cpu"] > CACHED_TARGET:
            teacher, student = C.make_models(args.teacher, args.student, r["size"])
            raw = make_raw_dataset(args.images, args.raw_size, r["raw_dir"])
            trainer = p1_trainer("kd cached", C.fresh(student), None, raw, r["cache_dir"], r["size"], args, out_dir)

            def run_epoch(prof, trainer=trainer):
                trainer.add_callback(profiler_callback(prof, "epoch"))
                trainer.train()

            total, rows_p, _ = profile(run_epoch)
            md += [f"### Profile: kd cached epoch at {r['size']} px (over the {CACHED_TARGET} target)", ""]
            md += profile_table(total, rows_p, r["steps"], "one epoch of `trainer.train()` reading the cache")

    # part 3
    if mem:
        base = mem["supervised"]["peak_mb"] - mem["supervised"]["baseline_mb"]
        mem_rows = [(n, f"{m['peak_mb']:.0f}", f"{m['baseline_mb']:.0f}", f"{m['peak_mb'] - m['baseline_mb']:.0f}",
                     f"{m['before_mb'] - m['baseline_mb']:.0f}", f"{(m['peak_mb'] - m['baseline_mb']) / base:.2f}",
                     f"{m['teacher_params_alive'] / 1e6:.2f} M", f"{m['ru_maxrss_mb']:.0f}")
                    for n, m in mem.items()]
        md += [f"## 3. Peak memory (fresh process per configuration, {cs} px)", "",
               "Each configuration runs in a new interpreter with every library imported first; baseline = RSS "
               "after the imports; peak = `VmHWM` of the process (not `ru_maxrss`: Linux carries the parent's "
               "maxrss into a child across fork + exec); 'set-up' = RSS just before training, after models, data, "
               f"trainer / task / box. Part-1 configurations train one epoch over the {args.images} raw images "
               f"({-(-args.images // args.batch_size)} steps); part-2 configurations one epoch of "
               f"{args.compare_steps} in-memory batches (created after the baseline, so they are counted). glibc "
               "allocator defaults in these processes. 'teacher params alive': parameters of live modules of the "
               f"teacher's class and size (`{cost['teacher_class']}`, {cost['params']['teacher'] / 1e6:.2f} M) "
               "found by a `gc` scan at the end of training.", "",
               C.md_table(["configuration", "peak RSS MiB", "baseline MiB", "**peak - baseline MiB**",
                           "set-up - baseline MiB", "/ supervised", "teacher params alive",
                           "`ru_maxrss` MiB (for reference)"], mem_rows), ""]
        cached_held = mem["kd cached"]["teacher_params_alive"]
        md += [f"kd cached: {'no teacher weights anywhere in the process' if cached_held == 0 else f'**{cached_held} teacher parameters alive**'}"
               f" (trainer.teachers: {mem['kd cached']['teachers_in_trainer']}); its peak is "
               f"{mem['kd live']['peak_mb'] - mem['kd cached']['peak_mb']:.0f} MiB below kd live's and "
               f"{mem['kd cached']['peak_mb'] - mem['supervised']['peak_mb']:+.0f} MiB from supervised's.", ""]

    # verdict
    lines = []
    for r in p1:
        ok = r["cached_over_supervised_cpu"] <= CACHED_TARGET
        lines.append(f"{r['size']} px: kd cached / supervised = **{r['cached_over_supervised_cpu']:.3f}** CPU "
                     f"({r['cached_over_supervised_wall']:.3f} wall) - target <= {CACHED_TARGET}: "
                     f"{'met' if ok else '**missed**'}; live / cached = **{r['live_over_cached_cpu']:.2f}x** CPU "
                     f"({r['live_over_cached_wall']:.2f}x wall).")
    for key, desc, lib, rc, rw in verdicts:
        lines.append(f"{desc}: hf_distill / {lib} = **{rc:.3f}** CPU ({rw:.3f} wall) - target <= 1: "
                     f"{'met' if rc <= 1.0 else '**missed**'}.")
    if package_fingerprint() != fingerprint:
        lines.append(f"**hf_distill's sources changed while this ran** (commit {commit} at the start, "
                     f"{git_commit()} at the end): later parts and the memory processes used other code; rerun.")
    bad_loss = [row for row in loss_rows if row[-1] != "yes"]
    lines.append("First-batch losses agree to the tolerance in every comparison." if not bad_loss else
                 f"**Losses disagree** in {len(bad_loss)} row(s).")
    plot_path = os.path.join(C.RESULTS, f"{args.out}.png")
    os.makedirs(C.RESULTS, exist_ok=True)
    plot(plot_path, p1, p2, mem, cs)
    md += ["## Verdict", "", *[f"* {line}" for line in lines], "",
           f"Plot: `{os.path.relpath(plot_path, os.path.dirname(C.HERE))}`. "
           f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.", ""]
    text = "\n".join(md)
    path = C.write_result(args.out, text)
    print(text)
    print(f"\nwritten to {path} and {plot_path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
