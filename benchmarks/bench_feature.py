"""Label-free feature distillation (issue 15, "Measured, in benchmarks"): quality of the student's
features (k-NN and linear probe with 1,000 labels) and step time against timm's
``FeatureDistillationTask``, on Fashion-MNIST (offline, CPU).

Setting (the same for every configuration; all seeds run are reported, whichever way they go):

* teachers (stand-ins for foundation models: they were trained WITH LABELS on the 60k training
  images of the same task, so their features already encode these classes; a real foundation model
  was trained on other data, and the distilled student here inherits label information the
  teacher saw; see the report):
  - ``fm_resnet18`` (CNN): timm resnet18, 1 channel, 28 px, reused from ``bench_fm.py teacher``
    (8 epochs, supervised). At 28 px its last map is 1x1: its "spatial" feature is its 512-d
    pooled vector on a 1x1 grid, so for this teacher summary and spatial are the same vector
    (only the loss form and the adaptor differ);
  - ``fm_vit_tiny_p7d6`` (ViT): timm ``vit_tiny_patch16_224`` configured with ``img_size=28,
    patch_size=7, in_chans=1, depth=6`` (192-d, 3 heads, 6 blocks instead of 12; class token + a
    4x4 patch grid: a quarter of the tokens of patch 4, to fit the CPU budget, and a grid unlike the
    student's 7x7, which the library aligns by average pooling), trained here with ``distill_method="supervised"`` on the
    60k training images (random horizontal flips, AdamW lr 1e-3, wd 0.05, cosine, 5% warm-up,
    batch 128, ``TEACHER_EPOCHS`` epochs), saved under ``~/.cache/hf_distill_bench/teachers``;
* student (the same everywhere): timm ``vit_tiny_patch16_224`` configured with ``img_size=28,
  patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3`` (~0.46M parameters, a 7x7
  token grid, so that the spatial target means something; a ResNet student at 28 px has a 1x1
  map). Summary feature = its normed class token (timm ``forward_head(pre_logits=True)``);
* training data for distillation: the 60,000 training images WITHOUT labels (items carry
  ``pixel_values`` only), random horizontal flips, ``STEPS`` optimizer steps of batch 128 (one
  epoch), AdamW lr 1e-3, weight decay 0.05, cosine schedule, 10% warm-up, gradient clipping 1.0
  (the Trainer's default), for every trained configuration;
* evaluation (frozen summary features, eval mode): the 10,000 test images, with 1,000 labelled
  training images (``stratified_subset(train, 1000, seed=0)``, the same for every run) as
  (i) the memory of DINO's weighted k-NN (k = 20, cosine, T = 0.07;
  ``hf_distill.models.features.knn_accuracy``) and (ii) the training set of a linear probe:
  features standardised with the 1,000 images' mean/std, then sklearn ``LogisticRegressionCV``
  (lbfgs, multinomial, C in {1e-3, 1e-2, 1e-1, 1, 10} by 5-fold CV on the 1,000 images only,
  max_iter 3000). The trainer's own ``evaluate`` (``eval_feature_cosine``, ``eval_knn_accuracy``
  with ``knn_train_dataset=`` the 1,000 images) is recorded too, as a cross-check.

Configurations (``--configs``):

* ``random``        (a) the student at its random initialisation, no training.
* ``supervised_1k`` (b) the student trained with labels on the 1,000 labelled images only
  (``distill_method="supervised"``, the same number of steps, flips), then the same evaluation.
* ``cnn_summary`` / ``cnn_spatial`` / ``cnn_both``   (c) / (d) / (e) ``distill_method="feature"``
  from ``fm_resnet18``, ``feature_targets`` summary / spatial / both (library defaults otherwise:
  adaptor MLP 4x, standardisation on the first 10 batches, weights 1).
* ``vit_summary`` / ``vit_spatial`` / ``vit_both``   the same from ``fm_vit_tiny_p7d6``.
* ``two_both``      (f) both teachers at once (``teacher_model=[cnn, vit]``), both targets.
* ``timm_cnn``      (g) timm 1.0.31 ``timm.task.FeatureDistillationTask`` on the same
  teacher/student pair (pooled pre-logits, MSE, a Linear projection 96 -> 512), label-free:
  ``task_loss_weight=0, distill_loss_weight=1`` (the task needs a target: zeros are passed; the
  classification term is computed and weighted 0). Run with a plain loop as timm's ``train.py``
  does (``task(x, y)["loss"].backward()``), with the Trainer's optimizer recipe reproduced: AdamW
  (same kwargs, same decay / no-decay parameter split, ``Trainer.get_decay_parameter_names``),
  transformers' cosine schedule with the same warm-up, clipping 1.0, the same steps and data.

Speed (``speed``): seconds per optimizer step, one process, 1 thread, runners interleaved step by
step on the same batches (``_bench_common.alternating``; order reversed every other step),
several repetitions, median of the per-repetition ratios: hf_distill ``DistillationTrainer``
feature distillation (``training_step`` + ``optimizer.step`` + ``zero_grad``, i.e.
``_bench_common.TrainerStep``; targets summary only, the like-for-like setting, and both) vs timm's
``FeatureDistillationTask`` (forward, backward, AdamW step, zero_grad), teacher ``fm_resnet18``,
the student above, batch 128 of real Fashion-MNIST images. The cached-feature path is not measured.

Commands (repository root, ``. .venv/bin/activate``, ``export OMP_NUM_THREADS=1``; runs are kept in
``results/bench_feature.json`` as they finish and a rerun skips them; two processes may fill the
same sweep, e.g. different configurations on the two cores)::

    python benchmarks/bench_fm.py teacher               # fm_resnet18, if ~/.cache lacks it
    python benchmarks/bench_feature.py teacher          # fm_vit_tiny_p7d6, once (~/.cache)
    python benchmarks/bench_feature.py runs             # every configuration x seeds 0 1 2
    python benchmarks/bench_feature.py runs --configs random supervised_1k cnn_summary   # or a part
    python benchmarks/bench_feature.py speed
    python benchmarks/bench_feature.py report           # results/bench_feature.md from the JSON

Results: ``results/bench_feature.md`` (report) and ``results/bench_feature.json`` (every run, the
teachers' references and the timing).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _method_bench import (  # noqa: E402
    CACHE_ROOT, RESULTS_DIR, FlipImages, Sweep, data, env_lines, make_timm, mean_std, md_table, paired,
    prepare, read_notes, setup_logging, stratified_subset,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments, load_model  # noqa: E402
from hf_distill.models.features import backbone_features, knn_accuracy  # noqa: E402
from hf_distill.models import count_parameters  # noqa: E402

log = logging.getLogger("bench")

NAME = "bench_feature"
CNN_TEACHER = "fm_resnet18"  # bench_fm.py's teacher
VIT_TEACHER = "fm_vit_tiny_p7d6"
VIT_ARCH = "vit_tiny_patch16_224"
VIT_KW = dict(img_size=28, patch_size=7, depth=6)
TEACHER_EPOCHS, TEACHER_LR, TEACHER_SEED = 3, 1e-3, 0
STUDENT_ARCH = "vit_tiny_patch16_224"
STUDENT_KW = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3)
BATCH, LR, WD, WARMUP = 128, 1e-3, 0.05, 0.1
TRAIN_IMAGES = 60000
STEPS = math.ceil(TRAIN_IMAGES / BATCH)  # one epoch of the unlabelled training images
LABELLED, LABELLED_SEED = 1000, 0
KNN_K, KNN_T = 20, 0.07
PROBE_CS = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
RUNS_DIR = CACHE_ROOT / "runs" / NAME

CONFIGS = ["random", "supervised_1k", "cnn_summary", "cnn_spatial", "cnn_both", "timm_cnn", "vit_summary",
           "vit_spatial", "vit_both", "two_both"]
LABELS = {
    "random": "(a) random initialisation, no training",
    "supervised_1k": "(b) supervised on the 1,000 labelled images only",
    "cnn_summary": "(c) feature distillation from the CNN teacher, summary only",
    "cnn_spatial": "(d) feature distillation from the CNN teacher, spatial only (1x1 map at 28 px)",
    "cnn_both": "(e) feature distillation from the CNN teacher, summary + spatial",
    "timm_cnn": "(g) timm FeatureDistillationTask from the CNN teacher (pooled MSE, Linear projection)",
    "vit_summary": "(c) feature distillation from the ViT teacher, summary only",
    "vit_spatial": "(d) feature distillation from the ViT teacher, spatial only (4x4 patch tokens)",
    "vit_both": "(e) feature distillation from the ViT teacher, summary + spatial",
    "two_both": "(f) feature distillation from both teachers (CNN + ViT), summary + spatial",
}
SETTINGS = {"student": f"{STUDENT_ARCH} {STUDENT_KW}", "teachers": [CNN_TEACHER, VIT_TEACHER],
            "vit_teacher": f"{VIT_ARCH} {VIT_KW} {TEACHER_EPOCHS} epochs", "train_images": TRAIN_IMAGES,
            "steps": STEPS, "batch": BATCH, "lr": LR, "weight_decay": WD, "warmup": WARMUP, "labelled": LABELLED,
            "labelled_seed": LABELLED_SEED, "knn": [KNN_K, KNN_T], "probe_Cs": PROBE_CS, "augmentation": "hflip"}


# ============================================================================ data
class Unlabelled(torch.utils.data.Dataset):
    """Training images only (``{"pixel_values"}``, no labels), randomly h-flipped (global torch RNG,
    seeded by the Trainer / the plain loop)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        img = self.x[i]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return {"pixel_values": img}


class Ctx:
    """Tensors (normalised [N,1,28,28]) of the 60k training images, the 1,000 labelled ones and the test set."""

    def __init__(self):
        from fashion_mnist import load_fashion_mnist, to_tensors

        self.xtr, self.ytr, self.xte, self.yte = data(None)
        lab = stratified_subset(load_fashion_mnist()["train"], LABELLED, seed=LABELLED_SEED)
        self.xl, self.yl = to_tensors(lab)
        self._teachers: dict[str, nn.Module] = {}

    def teacher(self, name: str) -> nn.Module:
        if name not in self._teachers:
            self._teachers[name] = load_teacher(name)
        return self._teachers[name]


def teacher_dir(name: str) -> Path:
    return CACHE_ROOT / "teachers" / name


def load_teacher(name: str) -> nn.Module:
    folder = teacher_dir(name)
    if not (folder / "bench_info.json").exists():
        how = "python benchmarks/bench_fm.py teacher" if name == CNN_TEACHER else "python benchmarks/bench_feature.py teacher"
        raise SystemExit(f"teacher {name} missing under {folder}: run `{how}` first")
    return prepare(load_model(str(folder))).eval()


def make_student(seed: int) -> nn.Module:
    return make_timm(STUDENT_ARCH, seed, **STUDENT_KW)


# ============================================================================ evaluation
@torch.no_grad()
def summaries(model: nn.Module, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([backbone_features(model, x[i:i + bs])[0].float() for i in range(0, len(x), bs)])
    model.train(was)
    return out


def linear_probe(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor) -> dict:
    """Logistic regression on standardised frozen features; C by 5-fold CV on the labelled images only."""
    from sklearn.linear_model import LogisticRegressionCV

    a, b = ftr.double().numpy(), fte.double().numpy()
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    clf = LogisticRegressionCV(Cs=PROBE_CS, cv=5, max_iter=3000, n_jobs=1)
    clf.fit(a, ytr.numpy())
    return {"probe_accuracy": float((clf.predict(b) == yte.numpy()).mean()), "probe_C": float(clf.C_[0])}


def evaluate_features(model: nn.Module, ctx: Ctx) -> dict:
    c0 = time.process_time()
    ftr, fte = summaries(model, ctx.xl), summaries(model, ctx.xte)
    res = {"knn_accuracy": knn_accuracy(ftr, ctx.yl, fte, ctx.yte, k=KNN_K, temperature=KNN_T),
           **linear_probe(ftr, ctx.yl, fte, ctx.yte), "feature_dim": int(ftr.shape[1])}
    res["eval_cpu_s"] = time.process_time() - c0
    return res


# ============================================================================ training
def make_args(out: str, method: str, seed: int, **kw) -> DistillationTrainingArguments:
    return DistillationTrainingArguments(**{
        **dict(output_dir=out, distill_method=method, max_steps=STEPS, per_device_train_batch_size=BATCH,
               per_device_eval_batch_size=500, learning_rate=LR, weight_decay=WD, lr_scheduler_type="cosine",
               warmup_steps=WARMUP, logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[], seed=seed,
               data_seed=seed, disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, eval_teacher=False), **kw})


TEACHERS_OF = {"cnn": [CNN_TEACHER], "vit": [VIT_TEACHER], "two": [CNN_TEACHER, VIT_TEACHER]}
TARGETS_OF = {"summary": ["summary"], "spatial": ["spatial"], "both": ["summary", "spatial"]}


def feature_trainer(ctx: Ctx, config: str, seed: int, student: nn.Module, train_ds=None) -> DistillationTrainer:
    which, target = config.split("_")
    teachers = [ctx.teacher(n) for n in TEACHERS_OF[which]]
    args = make_args(str(RUNS_DIR / f"{config}_s{seed}"), "feature", seed, feature_targets=TARGETS_OF[target])
    return DistillationTrainer(model=student, teacher_model=teachers if len(teachers) > 1 else teachers[0], args=args,
                               train_dataset=train_ds if train_ds is not None else Unlabelled(ctx.xtr),
                               knn_train_dataset=FlipImages(ctx.xl, ctx.yl))


def timm_task(student: nn.Module, teacher: nn.Module):
    """timm's FeatureDistillationTask, label-free (task loss weight 0); the student's pretrained_cfg
    mean/std set to the teacher's (both see the same normalised 1-channel input: timm would otherwise
    re-normalise between its 3-channel ImageNet defaults)."""
    from timm.task import FeatureDistillationTask
    from timm.task.distillation import DistillationTeacher

    t_cfg = teacher.pretrained_cfg
    student.pretrained_cfg = {**student.pretrained_cfg, "mean": tuple(t_cfg["mean"]), "std": tuple(t_cfg["std"])}
    task = FeatureDistillationTask(student, DistillationTeacher(teacher), distill_loss_weight=1.0,
                                   task_loss_weight=0.0, verbose=False)
    task.train()
    return task


def timm_optimizer(task, args: DistillationTrainingArguments, steps: int):
    """The Trainer's optimizer recipe on the task's trainable module (AdamW, its kwargs, decay split, cosine)."""
    from transformers import Trainer, get_scheduler

    module = task.trainable_module
    decay = set(Trainer.get_decay_parameter_names(None, module))
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = cls(groups, **kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                              num_training_steps=steps)
    return optimizer, scheduler


def train_timm(ctx: Ctx, seed: int, student: nn.Module) -> dict:
    from transformers import set_seed

    args = make_args(str(RUNS_DIR / f"timm_cnn_s{seed}"), "feature", seed)
    set_seed(seed)
    task = timm_task(student, ctx.teacher(CNN_TEACHER))
    optimizer, scheduler = timm_optimizer(task, args, STEPS)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(Unlabelled(ctx.xtr), batch_size=BATCH, shuffle=True, generator=g,
                                         num_workers=0)
    clip = list(task.get_clip_parameters())
    step, losses = 0, []
    c0, w0 = time.process_time(), time.perf_counter()
    while step < STEPS:
        for batch in loader:
            x = batch["pixel_values"]
            out = task(x, torch.zeros(len(x), dtype=torch.long))
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(clip, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                losses.append({"step": step, "loss_kd": float(out["kd_loss"])})
            if step >= STEPS:
                break
    train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
    task.eval()
    return {"train_cpu_s": train_cpu, "train_wall_s": train_wall, "steps": step, "loss_log": losses,
            "trainable_extra_params": count_parameters(task.trainable_module.projection)}


def others() -> list[str]:
    """Command lines of the other benchmark / python processes on the machine (what ran beside)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,etimes,args"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return []
    me = os.getpid()
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and int(parts[0]) != me and "python" in parts[2] and "benchmarks/" in parts[2]:
            rows.append(parts[2][:160])
    return sorted(set(rows))


def run_one(ctx: Ctx, config: str, seed: int) -> dict:
    beside0, load0 = others(), os.getloadavg()
    student = make_student(seed)
    res: dict = {"params": count_parameters(student)}
    if config == "random":
        res.update(train_cpu_s=0.0, train_wall_s=0.0, steps=0)
    elif config == "timm_cnn":
        res.update(train_timm(ctx, seed, student))
    else:
        if config == "supervised_1k":
            args = make_args(str(RUNS_DIR / f"{config}_s{seed}"), "supervised", seed)
            trainer = DistillationTrainer(model=student, args=args, train_dataset=FlipImages(ctx.xl, ctx.yl, hflip=True))
        else:
            trainer = feature_trainer(ctx, config, seed, student)
        c0, w0 = time.process_time(), time.perf_counter()
        trainer.train()
        res.update(train_cpu_s=time.process_time() - c0, train_wall_s=time.perf_counter() - w0,
                   steps=trainer.state.global_step,
                   trainable_extra_params=count_parameters(trainer.extra_modules),
                   loss_log=[{k: v for k, v in h.items() if k.startswith("loss") or k in ("step", "epoch")}
                             for h in trainer.state.log_history if "loss" in h])
        # the trainer's own evaluation (labelled test set; k-NN memory = the 1,000 labelled images)
        c1 = time.process_time()
        metrics = trainer.evaluate(eval_dataset=FlipImages(ctx.xte, ctx.yte))
        res["trainer_eval"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        res["trainer_eval_cpu_s"] = time.process_time() - c1
        student = trainer.student
    res.update(evaluate_features(student, ctx))
    res["accuracy"] = res["knn_accuracy"]  # Sweep's headline value
    res.update(loadavg_start=load0, loadavg_end=os.getloadavg(), beside_start=beside0, beside_end=others(),
               finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    return res


def cmd_runs(a) -> None:
    sweep = Sweep(NAME, SETTINGS)
    sweep.meta["command"] = " ".join(["python", *sys.argv])
    ctx = Ctx()
    refs = sweep.extra.setdefault("teacher_refs", {})
    for name in (CNN_TEACHER, VIT_TEACHER):
        if name in refs or not (teacher_dir(name) / "bench_info.json").exists():
            continue
        info = json.loads((teacher_dir(name) / "bench_info.json").read_text())
        refs[name] = {**evaluate_features(ctx.teacher(name), ctx), "info": info}
        sweep.save()
        log.info("teacher %s reference: %s", name, {k: v for k, v in refs[name].items() if k != "info"})
    for seed in a.seeds:
        for config in a.configs:
            if sweep.get(config, seed):
                continue
            log.info("run %s seed %d (beside: %s)", config, seed, others())
            res = run_one(ctx, config, seed)
            sweep.add(config, seed, res)
            log.info("   knn %.2f%%, probe %.2f%% (C %g), trainer knn %s, cosine %s", 100 * res["knn_accuracy"],
                     100 * res["probe_accuracy"], res["probe_C"],
                     res.get("trainer_eval", {}).get("eval_knn_accuracy"),
                     res.get("trainer_eval", {}).get("eval_feature_cosine"))


# ============================================================================ teacher
def cmd_teacher(a) -> None:
    from _method_bench import make_args as mb_args, train_eval, batched

    folder = teacher_dir(VIT_TEACHER)
    info_path = folder / "bench_info.json"
    if info_path.exists() and not a.force:
        log.info("teacher %s present: %s", VIT_TEACHER, info_path.read_text())
        return
    xtr, ytr, xte, yte = data(None)
    model = make_timm(VIT_ARCH, TEACHER_SEED, **VIT_KW)
    args = mb_args(str(RUNS_DIR / "teacher"), "supervised", TEACHER_EPOCHS, TEACHER_SEED, lr=TEACHER_LR, batch=BATCH,
                   warmup_steps=0.05, logging_steps=100)
    res = train_eval(model, None, args, FlipImages(xtr, ytr, hflip=True), FlipImages(xte, yte), keep_trainer=True)
    res.pop("_trainer").save_model(str(folder))
    reloaded = prepare(load_model(str(folder))).eval()
    test_logits, _ = batched(reloaded, xte)
    info = {"name": VIT_TEACHER, "arch": VIT_ARCH, "kwargs": VIT_KW, "seed": TEACHER_SEED, "epochs": TEACHER_EPOCHS,
            "train_images": len(ytr), "augmentation": "random horizontal flip", "lr": TEACHER_LR, "weight_decay": 0.05,
            "warmup": 0.05, "batch": BATCH, "test_accuracy": res["accuracy"],
            "test_accuracy_reloaded": float((test_logits.argmax(1) == yte).float().mean()),
            "params": count_parameters(reloaded), "train_cpu_s": res["train_cpu_s"],
            "train_wall_s": res["train_wall_s"], "torch_threads": torch.get_num_threads(),
            "loss_log": res["loss_log"]}
    info_path.write_text(json.dumps(info, indent=2))
    log.info("teacher %s: test %.2f%% (%.0f s CPU)", VIT_TEACHER, 100 * res["accuracy"], res["train_cpu_s"])


# ============================================================================ speed
class TimmStep:
    """One step of timm's feature task as its train loop does it: forward + loss, backward, AdamW, zero_grad."""

    def __init__(self, task, args):
        self.task = task
        self.optimizer, _ = timm_optimizer(task, args, 10**6)

    def step(self, batch) -> torch.Tensor:
        x = batch["pixel_values"]
        out = self.task(x, torch.zeros(len(x), dtype=torch.long))
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out["loss"].detach()


def cmd_speed(a) -> None:
    import tempfile

    from _bench_common import BatchDataset, TrainerStep, alternating, first_of, summarize, trainer_optimizer_kwargs, \
        tune_malloc

    trainer_optimizer_kwargs()
    malloc = tune_malloc("steady")
    sweep = Sweep(NAME, SETTINGS)
    sweep.meta["command"] = " ".join(["python", *sys.argv])
    xtr, _, _, _ = data(None)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xtr), generator=g)[: a.batches * BATCH]
    batches = [{"pixel_values": xtr[idx[i * BATCH:(i + 1) * BATCH]].contiguous()} for i in range(a.batches)]
    teacher = load_teacher(CNN_TEACHER)
    runners = {}
    # every TrainingArguments before any trainer: building one resets accelerate's state under the others
    timm_args = make_args(tempfile.mkdtemp(prefix="hfd_feat_"), "feature", 0)
    for name, targets in (("hf_summary", ["summary"]), ("hf_both", ["summary", "spatial"])):
        args = make_args(tempfile.mkdtemp(prefix="hfd_feat_"), "feature", 0, feature_targets=targets,
                         per_device_train_batch_size=1)
        trainer = DistillationTrainer(model=make_student(0), teacher_model=teacher, args=args,
                                      train_dataset=BatchDataset(batches), data_collator=first_of)
        runners[name] = TrainerStep(trainer)
    runners["timm"] = TimmStep(timm_task(make_student(0), load_teacher(CNN_TEACHER)), timm_args)
    beside0, load0 = others(), os.getloadavg()
    for r in runners.values():  # warm-up (also fills hf_distill's standardisation statistics: first 10 batches)
        for b in batches[: max(a.warmup, 10)]:
            r.step(b)
    times = alternating(runners, batches, a.reps, a.steps)
    res = {clock: summarize(t, "timm") for clock, t in times.items()}
    sweep.extra["speed"] = {"times": times, "summary": res, "reps": a.reps, "steps": a.steps, "batch": BATCH,
                            "teacher": CNN_TEACHER, "student": SETTINGS["student"], "threads": torch.get_num_threads(),
                            "malloc": malloc, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                            "beside_start": beside0, "beside_end": others(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    sweep.save()
    for clock in ("cpu", "wall"):
        for name, r in res[clock].items():
            log.info("%s %-10s median %.1f ms, paired ratio to timm %.3f", clock, name, r["median_ms"],
                     r["median_paired_ratio"])


# ============================================================================ report
def _pm(vals: dict) -> str:
    if not vals:
        return "-"
    m, s = mean_std(100 * v for v in vals.values())
    return f"{m:.2f} ± {s:.2f}" if len(vals) > 1 else f"{m:.2f}"


def _seeds(vals: dict) -> str:
    return ", ".join(f"{s}: {100 * v:.2f}" for s, v in vals.items())


def cmd_report(a) -> None:
    sweep = Sweep(NAME, SETTINGS)
    configs = [c for c in CONFIGS if sweep.values(c)]
    refs = sweep.extra.get("teacher_refs", {})
    L = ["# Label-free feature distillation on Fashion-MNIST: k-NN / linear probe with 1,000 labels, and step time "
         "against timm", "",
         "Issue 15, \"Measured, in benchmarks\". Script: `benchmarks/bench_feature.py` (its docstring has the exact "
         "commands and the definition of every configuration). Every seed run is reported.", "", "## Setting", ""]
    student_params = count_parameters(make_student(0))
    for name in (CNN_TEACHER, VIT_TEACHER):
        if name in refs:
            i = refs[name]["info"]
            arch = i["arch"] + (f" {i['kwargs']}" if "kwargs" in i else "")
            L.append(f"* Teacher `{name}`: timm {arch}, {i['params']:,} parameters, trained WITH LABELS on the 60,000 "
                     f"training images for {i['epochs']} epochs: **{100 * i['test_accuracy']:.2f}% test accuracy** "
                     f"({i['train_cpu_s'] / 60:.0f} min CPU).")
    L += [f"* Student (every configuration): timm `{STUDENT_ARCH}` with `{STUDENT_KW}`, in_chans 1, "
          f"{student_params:,} parameters, 7x7 token grid; summary = normed class token.",
          f"* Distillation data: the 60,000 training images without labels, random h-flips; budget {STEPS} steps of "
          f"batch {BATCH} (1 epoch), AdamW lr {LR}, wd {WD}, cosine, {int(100 * WARMUP)}% warm-up, clip 1.0 — the same "
          "for every trained configuration (supervised_1k: the same steps over the 1,000 labelled images, ~60 epochs).",
          f"* Evaluation: 10,000 test images; {LABELLED:,} labelled training images (stratified, seed {LABELLED_SEED}) as "
          f"k-NN memory (k={KNN_K}, cosine, T={KNN_T}) and linear-probe training set (standardised features, "
          "LogisticRegressionCV, C by 5-fold CV on the 1,000 only).",
          "* The teachers are stand-ins for foundation models, but they were trained with the labels of all 60k "
          "images of this very task: their features are already class-separating, and a student that copies them "
          "inherits that label information. A real foundation model (DINOv2, CLIP) was trained on other data and its "
          "advantage over a small supervised model is smaller; read (c)-(f) vs (b) with that in mind.",
          "* At 28 px the resnet18 teacher's last map is 1x1: its \"spatial\" target is its pooled vector on a 1x1 "
          "grid (the student's 7x7 map is average-pooled to 1x1), so `cnn_spatial` differs from `cnn_summary` only "
          "in the loss form (0.9 cos + 0.1 smooth-L1 vs cos), the adaptor input (the mean of the patch tokens vs the "
          "class token) and the exported summary (class token) is then trained only indirectly. The ViT teacher's "
          "spatial target is a real 4x4 patch grid (the student's 7x7 tokens are average-pooled to it).", "", "Configurations:", ""]
    L += [f"* `{c}`: {LABELS[c]}" for c in configs]
    L += ["", "## Quality", "", "Test accuracy (%) of the student's frozen summary features, mean ± std over seeds; "
          "per-seed values in the second table.", ""]
    rows = []
    for name in (CNN_TEACHER, VIT_TEACHER):
        if name in refs:
            r = refs[name]
            rows.append([f"teacher `{name}` (reference)", "-", f"{100 * r['knn_accuracy']:.2f}",
                         f"{100 * r['probe_accuracy']:.2f}", "-", "-", "-"])
    for c in configs:
        knn, probe = sweep.values(c, "knn_accuracy"), sweep.values(c, "probe_accuracy")
        cos = {s: r["trainer_eval"].get("eval_feature_cosine") for s, r in
               ((r["seed"], r) for r in sweep.runs if r["config"] == c) if "trainer_eval" in r}
        cos = {s: v for s, v in cos.items() if v is not None}
        cpu = sweep.values(c, "train_cpu_s")
        m_cos = f"{np.mean(list(cos.values())):.3f}" if cos else "-"
        rows.append([f"`{c}`", len(knn), _pm(knn), _pm(probe), m_cos, f"{np.mean(list(cpu.values())) / 60:.1f}",
                     f"{np.mean(list(sweep.values(c, 'train_wall_s').values())) / 60:.1f}"])
    L += md_table(["config", "seeds", "k-NN (k=20)", "linear probe", "feature cosine (trainer eval)",
                   "train CPU min / run", "train wall min / run"], rows)
    L += ["", "Per seed (%):", ""]
    rows = []
    for c in configs:
        tk = {r["seed"]: r["trainer_eval"]["eval_knn_accuracy"] for r in sweep.runs
              if r["config"] == c and "eval_knn_accuracy" in r.get("trainer_eval", {})}
        rows.append([f"`{c}`", _seeds(sweep.values(c, "knn_accuracy")), _seeds(sweep.values(c, "probe_accuracy")),
                     ", ".join(f"{s}: {v:g}" for s, v in sweep.values(c, "probe_C").items()), _seeds(tk) or "-"])
    L += md_table(["config", "k-NN", "linear probe", "probe C (CV)", "trainer's eval_knn_accuracy"], rows)
    pairs = [("cnn_summary", "supervised_1k"), ("cnn_both", "supervised_1k"), ("cnn_spatial", "cnn_summary"),
             ("cnn_both", "cnn_summary"), ("cnn_summary", "timm_cnn"), ("cnn_both", "timm_cnn"),
             ("vit_spatial", "vit_summary"), ("vit_both", "vit_summary"), ("vit_both", "vit_spatial"),
             ("two_both", "cnn_both"), ("two_both", "vit_both"), ("timm_cnn", "supervised_1k"),
             ("supervised_1k", "random")]
    rows = []
    for x, y in pairs:
        for key in ("knn_accuracy", "probe_accuracy"):
            if sweep.values(x, key) and sweep.values(y, key):
                d, ms, wins = paired(sweep.values(x, key), sweep.values(y, key))
                rows.append([f"`{x}` − `{y}`", key.split("_")[0], d, ms, wins])
    L += ["", "Paired per-seed differences (points; same seed = same student initialisation):", "",
          *md_table(["comparison", "metric", "per seed", "mean ± std", "wins"], rows)]
    sup = [r for r in sweep.runs if r["config"] == "supervised_1k" and "eval_accuracy" in r.get("trainer_eval", {})]
    if sup:
        L += ["", "`supervised_1k`'s own classifier head on the test set: "
              + ", ".join(f"seed {r['seed']}: {100 * r['trainer_eval']['eval_accuracy']:.2f}%" for r in sup) + "."]
    sp = sweep.extra.get("speed")
    if sp:
        L += ["", "## Speed", "",
              f"Seconds per optimizer step, teacher `{sp['teacher']}`, the student above, batch {sp['batch']} "
              f"(1x28x28), one process, {sp['threads']} torch thread, the three runners interleaved step by step on "
              f"the same batches (order reversed every other step), {sp['reps']} repetitions x {sp['steps']} steps "
              f"after a warm-up; allocator: {sp['malloc']}. hf_distill: `trainer.training_step` + `optimizer.step()` + "
              "`zero_grad()` (`_bench_common.TrainerStep`: no dataloader, scheduler, clipping or logging); timm: "
              "`task(x, y)['loss'].backward()`, AdamW step, `zero_grad` (no clipping either). Ratio = median over "
              "repetitions of (runner / timm) within the repetition.", ""]
        rows = []
        for clock in ("cpu", "wall"):
            for name, r in sp["summary"][clock].items():
                rows.append([clock, f"`{name}`", f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f} – {r['max_ms']:.1f}",
                             f"**{r['median_paired_ratio']:.3f}**",
                             ", ".join(f"{x:.3f}" for x in r["paired_ratios"])])
        L += md_table(["clock", "runner", "median ms / step", "range", "ratio to timm (median)", "per repetition"],
                      rows)
        L += ["", f"Load average at start / end: {', '.join(f'{v:.1f}' for v in sp['loadavg_start'])} / "
              f"{', '.join(f'{v:.1f}' for v in sp['loadavg_end'])}; beside: "
              + ("; ".join(f"`{c}`" for c in sorted(set(sp['beside_start']) | set(sp['beside_end']))) or "nothing")
              + "."]
    # what ran beside
    beside = {}
    for r in sweep.runs:
        for c in r.get("beside_start", []) + r.get("beside_end", []):
            beside.setdefault(c, set()).add(f"{r['config']} s{r['seed']}")
    if beside:
        L += ["", "## What ran beside", "", "Other benchmark processes seen (by `ps`) at the start or end of runs "
              "(the machine has 2 cores; wall times are indicative only, CPU times are this process's):", ""]
        for cmd, runs in sorted(beside.items()):
            L.append(f"* `{cmd}`: during {len(runs)} run(s)")
        loads = [r["loadavg_start"][0] for r in sweep.runs if "loadavg_start" in r]
        if loads:
            L += ["", f"1-minute load average at the start of runs: {min(loads):.1f} – {max(loads):.1f} "
                  f"(median {statistics.median(loads):.1f})."]
    if a.notes_list:
        L += ["", "## Notes", "", *[f"* {n}" for n in a.notes_list]]
    cpu_total = sum(v["cpu_s"] for v in sweep.meta.get("invocations", {}).values())
    commands = list(dict.fromkeys(v.get("command") for v in sweep.meta.get("invocations", {}).values()
                                  if v.get("command")))
    L += ["", "## Run", "", f"Commands that filled `{NAME}.json`: " + "; ".join(f"`{c}`" for c in commands) + ". "
          f"Total CPU of those processes: {cpu_total / 3600:.2f} h (teacher training not included).", "",
          *env_lines(sweep), ""]
    (RESULTS_DIR / f"{NAME}.md").write_text("\n".join(L))
    log.info("wrote %s", RESULTS_DIR / f"{NAME}.md")


# ============================================================================ CLI
def main(argv=None) -> int:
    global NAME, STEPS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--force", action="store_true")
    r = sub.add_parser("runs")
    r.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s = sub.add_parser("speed")
    s.add_argument("--reps", type=int, default=7)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--batches", type=int, default=20)
    s.add_argument("--warmup", type=int, default=10)
    rep = sub.add_parser("report")
    rep.add_argument("--notes_file", default=None, help="a text file of notes (one per paragraph) for the report")
    p.add_argument("--name", default=NAME, help=argparse.SUPPRESS)  # smoke tests: another results file
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests: fewer steps
    a = p.parse_args(argv)
    NAME, STEPS = a.name, a.steps or STEPS
    SETTINGS["steps"] = STEPS
    torch.set_num_threads(a.threads)
    setup_logging()
    if a.cmd == "report":
        a.notes_list = read_notes(a.notes_file)
    {"teacher": cmd_teacher, "runs": cmd_runs, "speed": cmd_speed, "report": cmd_report}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
