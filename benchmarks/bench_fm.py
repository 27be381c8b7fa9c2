"""Function matching (issue 17, "Measured, in benchmarks"): consistent vs inconsistent mixup teaching,
live vs cached teacher, a long schedule, on Fashion-MNIST (offline, CPU).

Setting (the same for every configuration; all seeds run are reported, whichever way they go):

* teacher ``fm_resnet18``: timm resnet18 (1 input channel, 28 px), trained here with
  ``distill_method="supervised"`` for 8 epochs on the 60k training images (random horizontal
  flips, AdamW lr 2e-3, weight decay 0.05, cosine, 3% warm-up, batch 128), saved under
  ``~/.cache/hf_distill_bench/teachers/fm_resnet18`` and reloaded with ``hf_distill.load_model``;
* student: ``bench_quality.SmallCNN(c1=16, c2=32)`` (two conv-BN-ReLU-pool blocks + linear,
  20,538 parameters; twice the width of the ``noisy`` benchmark's student);
* data: a stratified subset of 5,000 training images (``fashion_mnist.stratified_subset``, seed 0,
  the same for every run), test on the full 10,000 test images; 28x28 grey, no augmentation except
  what a configuration says (mixup); no random crops (see the report for why);
* budget: 100 epochs (3,900 + 100 = 4,000 optimizer steps: 39 batches of 128 and one of 8 per
  epoch), batch 128, AdamW lr 2e-3, weight decay 0.05, cosine schedule, 3% warm-up; the test set is
  evaluated every 10 epochs (curves), and at the end the test and the (unaugmented) training subset.

Configurations (``--configs``):

* ``supervised``      (a) labels only.
* ``supervised_mixup``    labels only, with the same mixup (mixed one-hot labels): a control for
  what mixup alone does to this student.
* ``kd_t1``           (b) KD without augmentation, the function-matching objective (alpha 1: KL
  only, T 1), teacher logits of the clean image (fixed per image: nothing is augmented).
* ``kd_t4``           (b') classic KD without augmentation, the library's defaults T 4, alpha 0.9.
* ``mix_clean_own``   (c) ``distill_method="function_matching"`` (mixup alpha 1, one lambda per batch,
  KL only, T 1) where the teacher saw the CLEAN image: the target of the mixed image
  ``lam * x_i + (1 - lam) * x_j`` is ``teacher(x_i)``. Built with the library's cached-logit path: the
  training items carry ``teacher_logits`` (of the unmixed image) and no ``mix_lam``, so the trainer
  mixes the batch itself and never runs the teacher (counted).
* ``mix_clean_mixed`` (c') inconsistent but label-mixup-like: the target is
  ``lam * softmax(teacher(x_i)) + (1 - lam) * softmax(teacher(x_j))`` (clean teacher outputs mixed
  like labels, ``mix(teacher(x))``), given to the trainer as the log of that distribution (exact at
  T = 1). The items come from a subclass of the library's ``EpochOrderedDataset`` that knows each
  position's batch, draws that batch's mixing with the library's ``BatchMixer`` (same seed, same
  draws as the trainer: checked) and mixes the clean teacher probabilities accordingly.
* ``fm_live``         (d) function matching, consistent: the live teacher sees the mixed batch.
* ``fm_cache``        (e) function matching from a teacher-output cache with mixing, built ONCE for
  all 100 epochs with ``build_teacher_cache(..., epochs=100, batch_size=128, seed=0,
  mixing=args.mixing)``; every seed trains from it with ``data_seed=0`` (the cache's seed fixes
  the epoch order and the mixing), ``seed`` = the student's initialisation seed. So ``fm_cache``
  seed 0 should equal ``fm_live`` seed 0 bit for bit, and seeds 1, 2 differ from ``fm_live`` in the
  data order / mixing as well as the init.

Timing (``timing``): CPU seconds per epoch of function matching, live teacher vs the cache, in one
process, 1 thread, interleaved (order rotated every repetition), ``time.process_time`` around
``trainer.train()`` of short runs (trainer construction excluded): ``fm_live`` (pre-decoded tensors,
what the accuracy runs use), ``fm_live_pil`` (the PIL dataset through
``hf_distill.data.with_image_transform``, the cache's own input path) and ``fm_cache``.

Commands used for the committed results (repository root, ``. .venv/bin/activate``,
``export OMP_NUM_THREADS=1``; at most two of these processes at a time; runs are kept in the JSON as
they finish, a rerun skips them, and two processes may fill the same sweep)::

    python benchmarks/bench_fm.py teacher                      # fm_resnet18, once (~/.cache)
    python benchmarks/bench_fm.py cache                        # the 100-epoch mixed cache, once
    python benchmarks/bench_fm.py runs --configs supervised supervised_mixup kd_t1 kd_t4 mix_clean_own mix_clean_mixed
    python benchmarks/bench_fm.py runs --configs fm_live       # side by side with the line above
    python benchmarks/bench_fm.py runs --configs fm_cache      # after `cache`
    python benchmarks/bench_fm.py timing
    python benchmarks/bench_fm.py report                       # results/bench_fm.md from the JSON

Results: ``results/bench_fm.md`` (report) and ``results/bench_fm.json`` (every run and the timing).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _method_bench import (  # noqa: E402
    CACHE_ROOT, RESULTS_DIR, SPEC, FlipImages, Sweep, batched, data, env_lines, make_timm, mean_std, md_table,
    paired, prepare, read_notes, setup_logging,
)
from bench_quality import small_cnn_student  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments, load_model  # noqa: E402
from hf_distill.mixing import BatchMixer, EpochOrderedDataset  # noqa: E402
from hf_distill.models import count_parameters  # noqa: E402
from hf_distill.training.evaluation import teacher_metrics  # noqa: E402

log = logging.getLogger("bench")

NAME = "bench_fm"
TEACHER = "fm_resnet18"
TEACHER_ARCH, TEACHER_SEED, TEACHER_EPOCHS = "resnet18", 0, 8
TEACHER_DIR = CACHE_ROOT / "teachers" / TEACHER
RUNS_DIR = CACHE_ROOT / "runs" / NAME
SUBSET, EPOCHS, BATCH, LR, WD = 5000, 100, 128, 2e-3, 0.05
C1, C2 = 16, 32
EVAL_EVERY_EPOCHS = 10
CACHE_SEED = 0
SHORT_CACHE_EPOCHS = 10
CONFIGS = ["supervised", "supervised_mixup", "kd_t1", "kd_t4", "mix_clean_own", "mix_clean_mixed", "fm_live",
           "fm_cache", "fm_cache_e10"]


def cache_dir(epochs: int | None = None) -> Path:
    epochs = EPOCHS if epochs is None else epochs
    return CACHE_ROOT / "teacher_caches" / f"{NAME}_{TEACHER}_n{SUBSET}_e{epochs}_b{BATCH}_mixup1_s{CACHE_SEED}"


LABELS = {
    "supervised": "(a) labels only",
    "supervised_mixup": "(a') labels only + mixup",
    "kd_t1": "(b) KD, no augmentation, T 1, alpha 1",
    "kd_t4": "(b') KD, no augmentation, T 4, alpha 0.9",
    "mix_clean_own": "(c) mixup, teacher on the clean image: target teacher(x_i)",
    "mix_clean_mixed": "(c') mixup, teacher on the clean images: target mix(teacher(x_i), teacher(x_j))",
    "fm_live": "(d) function matching, live teacher",
    "fm_cache": "(e) function matching, mixed cache of all 100 epochs (data_seed 0)",
    "fm_cache_e10": "(e') function matching, mixed cache of 10 epochs cycled 10 times (data_seed 0)",
}
SETTINGS = {"teacher": TEACHER, "subset": SUBSET, "epochs": EPOCHS, "batch": BATCH, "lr": LR, "weight_decay": WD,
            "student": f"SmallCNN({C1}, {C2})", "schedule": "cosine, 3% warm-up", "mixup": "alpha 1, batch mode",
            "cache_seed": CACHE_SEED, "eval_every_epochs": EVAL_EVERY_EPOCHS}


# ============================================================================ data
class Items(torch.utils.data.Dataset):
    """``{"pixel_values", "labels"}`` (+ ``teacher_logits``) from tensors; batched reads for the trainer."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None):
        self.x, self.y, self.logits = x, y, logits

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        out = []
        for i in indices:
            item = {"pixel_values": self.x[i], "labels": int(self.y[i])}
            if self.logits is not None:
                item["teacher_logits"] = self.logits[i]
            out.append(item)
        return out


class MixedCleanTargets(EpochOrderedDataset):
    """The epoch-ordered training data whose ``teacher_logits`` are ``log(lam p_t(x_i) + (1 - lam) p_t(x_j))``:
    the clean teacher probabilities of a position's sample and its batch partner, mixed with the lambda the
    trainer will draw for that batch (the library's ``BatchMixer`` with the same config and seed)."""

    def __init__(self, x, y, clean_logits: torch.Tensor, seed: int, mixing, batch_size: int):
        super().__init__(Items(x, y), seed)
        self.probs = clean_logits.double().softmax(-1)
        self.mixer = BatchMixer(mixing, clean_logits.shape[1], seed)
        self.batch_size = batch_size
        self._params: dict = {}

    def batch_params(self, epoch: int, batch: int):
        key = (epoch, batch)
        if key not in self._params:
            start = batch * self.batch_size
            size = min(self.batch_size, len(self) - start)
            self._params = {key: self.mixer.params(epoch, batch, (size, *self.dataset.x.shape[1:]))}
        return self._params[key]

    def __getitems__(self, positions):
        items = super().__getitems__(positions)
        perm = self.order.permutation(self.epoch)
        for item, p in zip(items, positions):
            p = int(p)
            batch, k = divmod(p, self.batch_size)
            params = self.batch_params(self.epoch, batch)
            lam, partner = params.lam[k], batch * self.batch_size + params.partner[k]
            mixed = lam * self.probs[int(perm[p])] + (1.0 - lam) * self.probs[int(perm[partner])]
            item["teacher_logits"] = mixed.log().float()
        return items


def raw_subset():
    """The training subset as the raw ``datasets.Dataset`` (PIL images), the same images as ``data(SUBSET)``."""
    from fashion_mnist import load_fashion_mnist, stratified_subset

    return stratified_subset(load_fashion_mnist()["train"], SUBSET, seed=0)


# ============================================================================ teacher
def load_teacher() -> nn.Module:
    return prepare(load_model(str(TEACHER_DIR))).eval()


def cmd_teacher(a) -> None:
    info_path = TEACHER_DIR / "bench_info.json"
    if info_path.exists() and not a.force:
        log.info("teacher %s present: %s", TEACHER, info_path.read_text())
        return
    from _method_bench import train_eval

    xtr, ytr, xte, yte = data(None)
    model = make_timm(TEACHER_ARCH, TEACHER_SEED)
    args = make_args(str(RUNS_DIR / "teacher"), "supervised", TEACHER_EPOCHS, TEACHER_SEED, eval_teacher=False)
    res = train_eval(model, None, args, FlipImages(xtr, ytr, hflip=True), FlipImages(xte, yte), keep_trainer=True)
    res.pop("_trainer").save_model(str(TEACHER_DIR))
    reloaded = load_teacher()
    test_logits, _ = batched(reloaded, xte)
    train_logits, _ = batched(reloaded, xtr)
    info = {"name": TEACHER, "arch": TEACHER_ARCH, "seed": TEACHER_SEED, "epochs": TEACHER_EPOCHS, "train_images": len(ytr),
            "augmentation": "random horizontal flip", "lr": LR, "weight_decay": WD, "batch": BATCH,
            "test_accuracy": res["accuracy"],
            "test_accuracy_reloaded": float((test_logits.argmax(1) == yte).float().mean()),
            "train_accuracy_reloaded": float((train_logits.argmax(1) == ytr).float().mean()),
            "params": count_parameters(reloaded), "train_cpu_s": res["train_cpu_s"], "train_wall_s": res["train_wall_s"],
            "torch_threads": torch.get_num_threads()}
    info_path.write_text(json.dumps(info, indent=2))
    log.info("teacher %s: %s", TEACHER, info)


def teacher_info() -> dict:
    return json.loads((TEACHER_DIR / "bench_info.json").read_text())


# ============================================================================ training
def make_args(out: str, method: str, epochs: float, seed: int, data_seed: int | None = None, eval_every: int = 0,
              **kw) -> DistillationTrainingArguments:
    steps_per_epoch = math.ceil(SUBSET / BATCH)
    evals = dict(eval_strategy="steps", eval_steps=eval_every * steps_per_epoch) if eval_every else dict(eval_strategy="no")
    return DistillationTrainingArguments(
        output_dir=out, distill_method=method, num_train_epochs=epochs, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=500, learning_rate=LR, weight_decay=WD, lr_scheduler_type="cosine",
        warmup_steps=0.03, logging_steps=5 * steps_per_epoch, save_strategy="no", report_to=[], seed=seed,
        data_seed=seed if data_seed is None else data_seed, disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
        **evals, **kw)


def config_args(config: str, seed: int, epochs: float | None = None, eval_every: int | None = None):
    epochs = EPOCHS if epochs is None else epochs
    eval_every = EVAL_EVERY_EPOCHS if eval_every is None else eval_every
    out = str(RUNS_DIR / f"{config}_s{seed}")
    if config == "supervised":
        return make_args(out, "supervised", epochs, seed, eval_every=eval_every)
    if config == "supervised_mixup":
        return make_args(out, "supervised", epochs, seed, eval_every=eval_every, mixup_alpha=1.0)
    if config == "kd_t1":
        return make_args(out, "kd", epochs, seed, eval_every=eval_every, temperature=1.0, alpha=1.0)
    if config == "kd_t4":
        return make_args(out, "kd", epochs, seed, eval_every=eval_every)  # library defaults T 4, alpha 0.9
    if config in ("mix_clean_own", "mix_clean_mixed", "fm_live", "fm_live_pil"):
        return make_args(out, "function_matching", epochs, seed, eval_every=eval_every)
    if config in ("fm_cache", "fm_cache_e10"):
        stored = SHORT_CACHE_EPOCHS if config == "fm_cache_e10" else None
        return make_args(out, "function_matching", epochs, seed, data_seed=CACHE_SEED, eval_every=eval_every,
                         teacher_cache_dir=str(cache_dir(stored)))
    raise ValueError(config)


class Ctx:
    """Data, teacher and its clean logits, loaded once per process."""

    def __init__(self):
        self.xtr, self.ytr, self.xte, self.yte = data(SUBSET)
        self.test = Items(self.xte, self.yte)
        self.train_clean = Items(self.xtr, self.ytr)
        self._raw = None
        self._teacher = None

    @staticmethod
    def teacher_ready() -> bool:
        return (TEACHER_DIR / "bench_info.json").exists()

    def _load_teacher(self):
        if self._teacher is None:
            self._teacher = load_teacher()
            self._train_logits, _ = batched(self._teacher, self.xtr)
            self._test_logits, _ = batched(self._teacher, self.xte)

    @property
    def teacher(self):
        self._load_teacher()
        return self._teacher

    @property
    def train_logits(self):
        self._load_teacher()
        return self._train_logits

    @property
    def test_logits(self):
        self._load_teacher()
        return self._test_logits

    @property
    def raw(self):
        if self._raw is None:
            self._raw = raw_subset()
            labels = torch.as_tensor(self._raw["label"])
            if not torch.equal(labels, self.ytr):
                raise RuntimeError("the raw subset's labels are not those of the tensor subset")
        return self._raw

    def train_data(self, config: str, args):
        if config in ("supervised", "supervised_mixup", "fm_live"):
            return Items(self.xtr, self.ytr)
        if config in ("kd_t1", "kd_t4", "mix_clean_own"):
            return Items(self.xtr, self.ytr, self.train_logits)
        if config == "mix_clean_mixed":
            return MixedCleanTargets(self.xtr, self.ytr, self.train_logits, args.data_seed, args.mixing, BATCH)
        if config == "fm_live_pil":
            from hf_distill.data import with_image_transform

            return with_image_transform(self.raw, SPEC, training=False, augmentation="none")
        if config in ("fm_cache", "fm_cache_e10"):
            from hf_distill.teacher_cache import with_teacher_cache

            return with_teacher_cache(self.raw, args.teacher_cache_dir, SPEC)
        raise ValueError(config)

    def trainer(self, config: str, seed: int, epochs: float | None = None, eval_every: int | None = None):
        args = config_args(config, seed, epochs, eval_every)
        teacher = None if config.startswith("supervised") else self.teacher
        trainer = DistillationTrainer(model=small_cnn_student(seed, C1, C2), teacher_model=teacher, args=args,
                                      train_dataset=self.train_data(config, args),
                                      eval_dataset=self.test if args.eval_strategy != "no" else None)
        if config == "mix_clean_mixed":  # the dataset's mixing draws are the trainer's
            ds = trainer.train_dataset
            assert ds.mixer.config == trainer.mixer.config and ds.mixer.seed == trainer.mixer.seed == args.data_seed
            for epoch, batch in ((0, 0), (3, 17), (99, 39)):
                shape = (min(BATCH, SUBSET - batch * BATCH), 1, 28, 28)
                assert trainer.mixer.params(epoch, batch, shape) == ds.mixer.params(epoch, batch, shape)
        return trainer


class CallCounter:
    def __init__(self, module: nn.Module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def run_one(ctx: Ctx, config: str, seed: int) -> dict:
    trainer = ctx.trainer(config, seed)
    counter = CallCounter(ctx.teacher) if ctx.teacher_ready() else None
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.train()
    train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
    # includes the periodic test evaluations' one teacher pass over the test set (the trainer keeps its logits)
    teacher_calls = counter.n if counter is not None else 0
    test = trainer.predict(ctx.test, metric_key_prefix="eval")
    train = trainer.predict(ctx.train_clean, metric_key_prefix="train")
    if counter is not None:
        counter.handle.remove()
    student_test, student_train = torch.as_tensor(test.predictions), torch.as_tensor(train.predictions)
    folder = RUNS_DIR / f"{config}_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"test": student_test, "train": student_train}, folder / "student_logits.pt")
    hist = trainer.state.log_history
    curve = [{k: h[k] for k in ("epoch", "eval_accuracy", "eval_teacher_agreement", "eval_teacher_kl") if k in h}
             for h in hist if "eval_accuracy" in h]
    losses = [{k: v for k, v in h.items() if k.startswith("loss") or k in ("epoch", "step")} for h in hist if "loss" in h]
    res = {
        "accuracy": test.metrics["eval_accuracy"], "train_accuracy": train.metrics["train_accuracy"],
        "gap": train.metrics["train_accuracy"] - test.metrics["eval_accuracy"],
        "test_metrics": {k: v for k, v in test.metrics.items() if isinstance(v, (int, float))},
        "train_metrics": {k: v for k, v in train.metrics.items() if isinstance(v, (int, float))},
        "train_cpu_s": train_cpu, "train_wall_s": train_wall, "steps": trainer.state.global_step,
        "teacher_forward_calls_in_train": teacher_calls, "data_seed": trainer.args.data_seed,
        "params": count_parameters(trainer.student), "curve": curve, "loss_log": losses,
        # the student's test logits, to compare runs bit for bit (fm_cache vs fm_live, seed 0)
        "test_logits_sha1": __import__("hashlib").sha1(student_test.numpy().tobytes()).hexdigest(),
        "test_logits_first": student_test[:4].tolist(),
        "student_logits_file": str(folder / "student_logits.pt"),
    }
    if ctx.teacher_ready():
        res.update(own_agreement(ctx, student_test, student_train))
    return res


def own_agreement(ctx: Ctx, student_test: torch.Tensor, student_train: torch.Tensor) -> dict:
    """Agreement and KL with the teacher computed here from the stored logits (every configuration, the
    teacher-less ones too; equal to the trainer's ``eval_teacher_*`` where it reports them)."""
    t = teacher_metrics(student_test.numpy(), ctx.test_logits.numpy(), ctx.yte.numpy())
    tr = teacher_metrics(student_train.numpy(), ctx.train_logits.numpy(), ctx.ytr.numpy())
    return {"agreement_test": t["teacher_agreement"], "kl_test": t["teacher_kl"],
            "agreement_train": tr["teacher_agreement"], "kl_train": tr["teacher_kl"],
            "teacher_accuracy_test": t["teacher_accuracy"], "teacher_accuracy_train": tr["teacher_accuracy"]}


def cmd_runs(a) -> None:
    sweep = Sweep(NAME, SETTINGS)
    sweep.meta["command"] = " ".join(["python", *sys.argv])
    ctx = Ctx()
    if ctx.teacher_ready():
        sweep.extra["teacher"] = teacher_info()
    elif any(c not in ("supervised", "supervised_mixup") for c in a.configs):
        raise SystemExit("train the teacher first: python benchmarks/bench_fm.py teacher")
    for seed in a.seeds:
        for config in a.configs:
            if sweep.get(config, seed):
                continue
            res = run_one(ctx, config, seed)
            sweep.add(config, seed, res)
            log.info("   train %.2f%%, agreement %.2f%%, teacher calls in train %d", 100 * res["train_accuracy"],
                     100 * res.get("agreement_test", float("nan")), res["teacher_forward_calls_in_train"])
    fill_agreement(sweep, ctx)


def fill_agreement(sweep: Sweep, ctx: Ctx) -> None:
    """Agreement of runs made before the teacher existed (teacher-less configurations), from their saved logits."""
    if not ctx.teacher_ready():
        return
    changed = False
    for r in sweep.runs:
        if "agreement_test" not in r:
            logits = torch.load(r["student_logits_file"])
            r.update(own_agreement(ctx, logits["test"], logits["train"]))
            changed = True
    if changed:
        sweep.save()


# ============================================================================ cache
def cmd_cache(a) -> None:
    from hf_distill.teacher_cache import build_teacher_cache

    sweep = Sweep(NAME, SETTINGS)
    sweep.meta["command"] = " ".join(["python", *sys.argv])
    raw = raw_subset()
    args = config_args("fm_live", CACHE_SEED)
    teacher = load_teacher()
    epochs = a.epochs or EPOCHS
    folder = cache_dir(epochs)
    c0, w0 = time.process_time(), time.perf_counter()
    cache = build_teacher_cache(teacher, raw, SPEC, str(folder), epochs=epochs, batch_size=BATCH, seed=CACHE_SEED,
                                mixing=args.mixing, teacher_id=TEACHER, shard_size=10_000)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    size = sum(f.stat().st_size for f in folder.iterdir())
    info = {"dir": str(folder), "entries": len(cache), "epochs": epochs, "batch_size": BATCH, "seed": CACHE_SEED,
            "mixing": args.mixing.to_dict(), "build_cpu_s": cpu, "build_wall_s": wall, "bytes": size}
    caches = sweep.extra.setdefault("caches", {})
    old = caches.get(str(epochs), {})
    if old and cpu < 0.5 * old.get("build_cpu_s", 0):  # a rerun found the cache complete: keep the build's times
        info.update(build_cpu_s=old["build_cpu_s"], build_wall_s=old["build_wall_s"])
    caches[str(epochs)] = info
    sweep.save()
    # the pixels the cache replays are those of the tensor data, bit for bit
    ctx_x, _, _, _ = data(SUBSET)
    from hf_distill.data import with_image_transform

    pil = with_image_transform(raw, SPEC)
    same = all(torch.equal(pil[i]["pixel_values"], ctx_x[i]) for i in range(0, SUBSET, 97))
    sweep.extra["pixels_identical_pil_vs_tensor"] = same
    sweep.save()
    log.info("cache: %s (pixels identical: %s)", info, same)


# ============================================================================ timing
def cmd_timing(a) -> None:
    sweep = Sweep(NAME, SETTINGS)
    sweep.meta["command"] = " ".join(["python", *sys.argv])
    ctx = Ctx()
    variants = a.variants
    per = {v: [] for v in variants}
    for rep in range(a.reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            trainer = ctx.trainer(v, 0, epochs=a.epochs, eval_every=0)
            counter = CallCounter(ctx.teacher)
            load0 = os.getloadavg()[0]
            c0, w0 = time.process_time(), time.perf_counter()
            trainer.train()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            counter.handle.remove()
            per[v].append({"cpu_s_per_epoch": cpu / a.epochs, "wall_s_per_epoch": wall / a.epochs,
                           "teacher_calls_per_epoch": counter.n / a.epochs, "loadavg_1min": load0})
            log.info("timing rep %d %-12s %.2f s CPU / epoch (%.2f wall), teacher calls %d", rep, v, cpu / a.epochs,
                     wall / a.epochs, counter.n)
    sweep.extra["timing"] = {"epochs_per_measure": a.epochs, "reps": a.reps, "variants": per,
                             "note": a.note, "threads": torch.get_num_threads(),
                             "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    sweep.save()


# ============================================================================ report
def cmd_report(a) -> None:
    sweep = Sweep(NAME, SETTINGS)
    fill_agreement(sweep, Ctx())
    configs = [c for c in CONFIGS if sweep.values(c)]
    t = teacher_info()
    caches = sweep.extra.get("caches", {})
    student_params = count_parameters(small_cnn_student(0, C1, C2))
    L = ["# Function matching on Fashion-MNIST: consistent vs inconsistent mixup teaching, live vs cached teacher",
         "", "Issue 17, \"Measured, in benchmarks\". Script: `benchmarks/bench_fm.py` (its docstring has the exact "
         "commands and every configuration's definition). Every seed run is reported.", "",
         "## Setting", "",
         f"* Teacher `{TEACHER}`: timm {t['arch']} ({t['params']:,} parameters, 1 input channel, 28 px), trained here "
         f"for {t['epochs']} epochs on the 60,000 training images (random horizontal flips, AdamW lr {t['lr']}, wd "
         f"{t['weight_decay']}, cosine, batch {t['batch']}): **{100 * t['test_accuracy']:.2f}% test**, "
         f"{100 * t['train_accuracy_reloaded']:.2f}% train; {t['train_cpu_s'] / 60:.0f} min CPU.",
         f"* Student: `SmallCNN({C1}, {C2})` from `bench_quality.py` ({student_params:,} parameters), the same "
         "initialisation per seed in every configuration (seed = init seed = data seed, except `fm_cache`).",
         f"* Data: stratified subset of {SUBSET:,} training images (the same for all runs), test on the 10,000 test "
         "images. No random crops and no flips: mixup is the only augmentation (why: see the notes).",
         f"* Budget: {EPOCHS} epochs ({EPOCHS * math.ceil(SUBSET / BATCH):,} steps), batch {BATCH}, AdamW lr {LR}, "
         f"weight decay {WD}, cosine, 3% warm-up, for every configuration. Mixup: the library's, alpha 1, "
         "`mixup_mode=\"batch\"` (one lambda ~ Beta(1, 1) per batch, partner B-1-i), every batch mixed "
         "(`mixup_prob` 1); the `function_matching` preset (alpha 1: KL only, T 1, mixup alpha 1).",
         "", "Configurations:", ""]
    L += [f"* `{c}`: {LABELS[c]}" for c in configs]
    L += ["", "## Results", "",
          "Test accuracy, train accuracy (the 5,000 training images, unaugmented), train-test gap and top-1 agreement "
          "with the teacher on the test set (`eval_teacher_agreement`), mean ± std over seeds (%); per-seed values "
          "below.", ""]
    rows = []
    for c in configs:
        acc = sweep.values(c)
        tr = sweep.values(c, "train_accuracy")
        gap = sweep.values(c, "gap")
        agr = sweep.values(c, "agreement_test")
        kl = sweep.values(c, "kl_test")
        cpu = sweep.values(c, "train_cpu_s")
        m_kl, s_kl = mean_std(kl.values())
        rows.append([f"`{c}`", len(acc), _pm(acc), _pm(tr), _pm(gap), _pm(agr), f"{m_kl:.3f} ± {s_kl:.3f}",
                     f"{np.mean(list(cpu.values())) / 60:.1f}"])
    L += md_table(["config", "seeds", "test acc", "train acc", "gap (train − test)", "teacher agreement (test)",
                   "KL(teacher‖student) test", "train CPU min / run"], rows)
    L += ["", f"Teacher on the same test set: {100 * t['test_accuracy']:.2f}%.", "", "Per seed (test accuracy %):", ""]
    rows = []
    for c in configs:
        rows.append([f"`{c}`", ", ".join(f"{s}: {100 * v:.2f}" for s, v in sweep.values(c).items()),
                     ", ".join(f"{s}: {100 * v:.2f}" for s, v in sweep.values(c, "gap").items()),
                     ", ".join(f"{s}: {100 * v:.2f}" for s, v in sweep.values(c, "agreement_test").items())])
    L += md_table(["config", "test accuracy", "gap", "agreement"], rows)
    pairs = [("fm_live", "mix_clean_own"), ("fm_live", "mix_clean_mixed"), ("fm_live", "kd_t1"), ("fm_live", "kd_t4"),
             ("fm_live", "supervised"), ("kd_t1", "supervised"), ("kd_t4", "supervised"),
             ("supervised_mixup", "supervised"), ("fm_cache", "fm_live")]
    rows = []
    for x, y in pairs:
        if sweep.values(x) and sweep.values(y):
            d, ms, wins = paired(sweep.values(x), sweep.values(y))
            rows.append([f"`{x}` − `{y}`", d, ms, wins])
    L += ["", "Paired per-seed test-accuracy differences (points; same seed = same student initialisation):", "",
          *md_table(["comparison", "per seed", "mean ± std", "wins"], rows)]
    # curves
    L += ["", "## Test accuracy during training (mean over seeds, %)", ""]
    epochs = sorted({round(p["epoch"]) for c in configs for r in sweep.runs if r["config"] == c for p in r["curve"]})
    rows = []
    for c in configs:
        row = [f"`{c}`"]
        for e in epochs:
            vals = [p["eval_accuracy"] for r in sweep.runs if r["config"] == c for p in r["curve"]
                    if round(p["epoch"]) == e]
            row.append(f"{100 * np.mean(vals):.2f}" if vals else "-")
        rows.append(row)
    L += md_table(["config", *[f"ep {e}" for e in epochs]], rows)
    rows = []
    for c in configs:
        row = [f"`{c}`"]
        for e in epochs:
            vals = [p["eval_teacher_agreement"] for r in sweep.runs if r["config"] == c for p in r["curve"]
                    if round(p["epoch"]) == e and "eval_teacher_agreement" in p]
            row.append(f"{100 * np.mean(vals):.2f}" if vals else "-")
        rows.append(row)
    L += ["", "Teacher agreement on the test set during training (mean over seeds, %; the trainer's "
          "`eval_teacher_agreement`, absent for the teacher-less `supervised` runs):", "",
          *md_table(["config", *[f"ep {e}" for e in epochs]], rows)]
    # cache / live
    L += ["", "## Cached vs live teacher", ""]
    live0, cache0 = sweep.get("fm_live", 0), sweep.get("fm_cache", 0)
    if live0 and cache0:
        same = live0["test_logits_sha1"] == cache0["test_logits_sha1"]
        L += [f"`fm_cache` seed 0 (data_seed 0) against `fm_live` seed 0: final test logits "
              f"{'bit-identical' if same else 'DIFFERENT'} (sha1 of the 10,000 x 10 logits), test accuracy "
              f"{100 * cache0['accuracy']:.2f}% vs {100 * live0['accuracy']:.2f}%.", ""]
    for key, cache in sorted(caches.items(), key=lambda kv: -int(kv[0])):
        config = "fm_cache" if int(key) == EPOCHS else f"fm_cache_e{key}"
        L += [f"The {key}-epoch cache (`{config}`): {cache['entries']:,} mixed views ({cache['bytes'] / 2**20:.0f} MiB), "
              f"built once with `build_teacher_cache(..., epochs={key}, batch_size={BATCH}, seed={CACHE_SEED}, "
              f"mixing=args.mixing)` in {cache['build_cpu_s'] / 60:.1f} min CPU ({cache['build_wall_s'] / 60:.1f} min "
              f"wall), reused by all {len(sweep.values(config))} `{config}` seeds.", ""]
    tim = sweep.extra.get("timing")
    if tim:
        rows = []
        med = {}
        for v, ms in tim["variants"].items():
            cpu = [m["cpu_s_per_epoch"] for m in ms]
            med[v] = float(np.median(cpu))
            rows.append([f"`{v}`", f"{med[v]:.2f}", ", ".join(f"{x:.2f}" for x in cpu),
                         f"{np.median([m['wall_s_per_epoch'] for m in ms]):.2f}",
                         f"{np.mean([m['teacher_calls_per_epoch'] for m in ms]):.0f}"])
        L += [f"CPU time per epoch ({SUBSET:,} images), one process, {tim['threads']} torch thread, "
              f"{tim['reps']} interleaved repetitions of {tim['epochs_per_measure']}-epoch runs (order rotated), "
              "`time.process_time()` around `trainer.train()`:", "",
              *md_table(["variant", "median CPU s / epoch", "each repetition", "median wall s / epoch",
                         "teacher forwards / epoch"], rows), ""]
        if "fm_cache" in med and "fm_live" in med:
            L += [f"Ratio cached / live (CPU per epoch): **{med['fm_cache'] / med['fm_live']:.2f}** against the "
                  "tensor-data live run"
                  + (f", **{med['fm_cache'] / med['fm_live_pil']:.2f}** against the live run reading the same PIL "
                     "dataset as the cache (`fm_live_pil`)" if "fm_live_pil" in med else "") + ".", ""]
        if tim.get("note"):
            L += [f"Load during the timing: {tim['note']}", ""]
    L += ["## Notes", "", *[f"* {n}" for n in a.notes_list], ""] if a.notes_list else []
    cpu_total = sum(v["cpu_s"] for v in sweep.meta.get("invocations", {}).values())
    L += ["## Run", "", f"Total CPU of the processes that filled `{NAME}.json` (runs, cache, timing): "
          f"{cpu_total / 3600:.2f} h; the teacher: {t['train_cpu_s'] / 3600:.2f} h more.", "", *env_lines(sweep), ""]
    (RESULTS_DIR / f"{NAME}.md").write_text("\n".join(L))
    log.info("wrote %s", RESULTS_DIR / f"{NAME}.md")


def _pm(vals: dict) -> str:
    m, s = mean_std(100 * v for v in vals.values())
    return f"{m:.2f} ± {s:.2f}"


# ============================================================================ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--force", action="store_true")
    c = sub.add_parser("cache")
    c.add_argument("--epochs", type=int, default=None, help=f"stored epochs (default {EPOCHS}, the training length)")
    r = sub.add_parser("runs")
    r.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ti = sub.add_parser("timing")
    ti.add_argument("--variants", nargs="+", default=["fm_live", "fm_live_pil", "fm_cache"])
    ti.add_argument("--reps", type=int, default=4)
    ti.add_argument("--epochs", type=int, default=2)
    ti.add_argument("--note", default="")
    rep = sub.add_parser("report")
    rep.add_argument("--notes_file", default=None, help="a text file of notes (one per paragraph) for the report")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    setup_logging()
    if a.cmd == "report":
        a.notes_list = read_notes(a.notes_file)
    {"teacher": cmd_teacher, "cache": cmd_cache, "runs": cmd_runs, "timing": cmd_timing, "report": cmd_report}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
