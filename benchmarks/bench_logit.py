"""Logit-distillation objectives on Fashion-MNIST (issue 16, "Measured, in benchmarks"), offline, CPU.

What it measures (every seed is kept in the JSON files and reported, whichever way it goes):

1. ``main``: the FitNets benchmark's pair and budget (``bench_quality.py fitnets``): the resnet18
   teacher ``resnet18_s0`` (5 epochs on the 60k images), the thin-deep student (timm ResNet
   BasicBlock [3, 3, 3, 3], 1.10M parameters), a stratified 10k training subset, no augmentation,
   20 epochs, batch 128, AdamW lr 2e-3, weight decay 0.05, cosine, 3% warm-up; test on the 10k
   test images. Configurations: the student alone; KD over T in {1, 4} x alpha in {0.5, 0.9};
   DKD with its defaults (warm-up 20 epochs = the whole budget) and with a 2-epoch warm-up;
   DIST with its defaults; KD + logit standardisation (T = 2, alpha = 0.9); hard distillation
   (alpha = 0.5).
2. ``strong``: a much stronger teacher than student (where DIST claims its gain): the same
   teacher, data and budget with the tiny ``SmallCNN(c1=4, c2=8)`` student (4,278 parameters):
   alone, the KD grid, DIST, DKD (2-epoch warm-up).
3. ``deit``: a DeiT distillation-token student (timm ``deit_tiny_distilled_patch16_224`` built at
   28 px, patch 4, embed 64, depth 4, 2 heads, 1 channel: 206k parameters) with the resnet18
   teacher: ``supervised`` (both heads learn the labels), soft (``kd`` through the distillation
   token) and hard (``distill_loss="hard"``, alpha 0.5); test accuracy of the mean of the heads
   (what evaluation and the exported model use) and of each head.
4. ``losses``: hf_distill's DIST and KD + logit-standardisation losses against torchdistill's
   ``DISTLoss`` and ``LogitStdKDLoss`` on the same batch (same logits, aligned weights), and the
   first-batch loss of a ``DistillationTrainer`` against a torchdistill ``DistillationBox`` from the
   same initial weights; DKD against a verbatim copy of the authors' ``dkd_loss`` (torchdistill
   has no DKD). ``timing``: the step time of DIST, hf_distill / torchdistill, the item-1 pair
   (live teacher in both), same batches, one thread, CPU time (``time.process_time``),
   repetitions interleaved (order rotated), as ``bench_speed.py`` does for KD. torchdistill is
   installed in a separate venv only; ``losses`` and ``timing`` run with that venv's python.

Items 1-3 read the teacher's logits from a cache (``_method_bench.FlipImages`` with
``teacher_logits``): computed once per process with the live teacher in eval mode on the exact
training tensors, the trainer takes them from the batch and the teacher never runs in training
(counted: a forward hook on the teacher must see 0 calls). Exact for these objectives, which read
only the teacher's logits.

Commands used for the committed results (repository root, ``. .venv/bin/activate``,
``OMP_NUM_THREADS=1``; at most two processes at a time, seeds split between them, the JSON files
merge under a lock)::

    python benchmarks/bench_quality.py teacher --only resnet18_s0     # the teacher, once (~/.cache)
    python benchmarks/bench_logit.py main --seeds 0 1                 # process A
    python benchmarks/bench_logit.py main --seeds 2                   # process B, then:
    python benchmarks/bench_logit.py strong --seeds 0 1 2 3 4
    python benchmarks/bench_logit.py deit --seeds 0                   # process A, after main
    python benchmarks/bench_logit.py deit --seeds 1 2                 # process B, after strong
    # torchdistill 1.1.5 in its own venv that sees the main venv's packages through a .pth file:
    #   python -m venv /tmp/tdvenv && echo /work/main/.venv/lib/python3.11/site-packages \
    #     > /tmp/tdvenv/lib/python3.11/site-packages/zz_main.pth && /tmp/tdvenv/bin/pip install --no-deps torchdistill==1.1.5
    /tmp/tdvenv/bin/python benchmarks/bench_logit.py losses
    /tmp/tdvenv/bin/python benchmarks/bench_logit.py timing           # last, alone on the machine as far as possible
    python benchmarks/bench_logit.py report                           # results/bench_logit.md from the JSON files

Results: ``results/bench_logit.md`` (report), ``results/bench_logit_{main,strong,deit}.json`` (every
run), ``results/bench_logit_torchdistill.json`` (losses and timing).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the repository root too: the torchdistill venv sees the main venv's packages through a plain .pth
# path, which does not run the editable install's finder
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _method_bench import (  # noqa: E402
    CACHE_ROOT, RESULTS_DIR, CallCounter, FlipImages, Sweep, batched, data, environment, git_state, log, make_args,
    make_timm, md_table, mean_std, paired, setup_logging, train_eval,
)
from bench_quality import load_teacher, small_cnn_student, teacher_dir, thin_deep_student  # noqa: E402

from hf_distill.models import count_parameters  # noqa: E402

NAME = "bench_logit"
TEACHER = "resnet18_s0"
WORK = CACHE_ROOT / "runs" / NAME
TD_FILE = RESULTS_DIR / f"{NAME}_torchdistill.json"

# ============================================================================ configurations
KD_GRID = [(1.0, 0.5), (1.0, 0.9), (4.0, 0.5), (4.0, 0.9)]


def kd_key(t: float, a: float) -> str:
    return f"kd_T{t:g}_a{a:g}"


# key -> (distill_method, extra arguments, label)
CONFIGS: dict[str, tuple[str, dict, str]] = {
    "alone": ("supervised", {}, "student alone (`supervised`)"),
    **{kd_key(t, a): ("kd", dict(temperature=t, alpha=a), f"KD T={t:g}, alpha={a:g}") for t, a in KD_GRID},
    "dkd": ("dkd", {}, "DKD defaults (alpha 1, beta 8, T 4, warm-up 20 epochs = whole budget)"),
    "dkd_w2": ("dkd", dict(dkd_warmup_epochs=2.0), "DKD, warm-up 2 epochs (alpha 1, beta 8, T 4)"),
    "dkd_w2_b1": ("dkd", dict(dkd_warmup_epochs=2.0, dkd_beta=1.0), "DKD, warm-up 2 epochs, beta 1 (alpha 1, T 4)"),
    "dist": ("dist", {}, "DIST defaults (beta = gamma = 1, weight 2, CE 1, T 1)"),
    "kd_ls_T2_a0.9": ("kd", dict(temperature=2.0, alpha=0.9, logit_standardization=True),
                      "KD + logit standardisation, T=2, alpha=0.9"),
    "hard_a0.5": ("kd", dict(distill_loss="hard", alpha=0.5), "hard distillation (teacher argmax), alpha=0.5"),
    # the paper's CIFAR weighting, CE 0.1 : KD 9, as a convex combination (alpha = 9 / 9.1)
    "kd_ls_T2_paper": ("kd", dict(temperature=2.0, alpha=9.0 / 9.1, logit_standardization=True),
                       "KD + logit standardisation, T=2, alpha=9/9.1 (the paper's CE 0.1 : KD 9)"),
}

DEIT = dict(img_size=28, patch_size=4, embed_dim=64, depth=4, num_heads=2)
EXPERIMENTS = {
    "main": dict(student="thin_deep",
                 configs=["alone", *[kd_key(t, a) for t, a in KD_GRID], "dkd", "dkd_w2", "dist", "kd_ls_T2_a0.9",
                          "hard_a0.5", "kd_ls_T2_paper"]),
    "strong": dict(student="small_cnn", c1=4, c2=8,
                   configs=["alone", *[kd_key(t, a) for t, a in KD_GRID], "dist", "dkd_w2", "dkd_w2_b1"]),
    "deit": dict(student="deit", **DEIT, configs=["alone", kd_key(4.0, 0.5), "hard_a0.5"]),
}
# the same data, budget and recipe for every experiment (the FitNets benchmark's)
COMMON = dict(teacher=TEACHER, train_subset=10000, epochs=20, lr=2e-3, batch=128, weight_decay=0.05,
              schedule="cosine", warmup=0.03, hflip=False)


def settings_of(experiment: str) -> dict:
    e = {k: v for k, v in EXPERIMENTS[experiment].items() if k != "configs"}
    return {"experiment": experiment, **COMMON, **e}


def make_student(s: dict, seed: int):
    if s["student"] == "thin_deep":
        return thin_deep_student(seed)
    if s["student"] == "small_cnn":
        return small_cnn_student(seed, s["c1"], s["c2"])
    if s["student"] == "deit":
        return make_timm("deit_tiny_distilled_patch16_224", seed, **{k: s[k] for k in DEIT})
    raise ValueError(s["student"])


def code_state() -> dict:
    """Git commit, uncommitted library files and a hash of the library's source as this process loaded it
    (the library is developed while the sweeps run: each run records the code it trained with)."""
    import hashlib

    import hf_distill

    root = Path(hf_distill.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return {**git_state(), "hf_distill_sha256": h.hexdigest()[:16]}


def teacher_info() -> dict:
    p = teacher_dir(TEACHER) / "bench_info.json"
    if not p.exists():
        raise SystemExit(f"teacher {TEACHER} missing: run `python benchmarks/bench_quality.py teacher --only {TEACHER}`")
    return json.loads(p.read_text())


# ============================================================================ accuracy sweeps
def cmd_sweep(a) -> None:
    s = settings_of(a.cmd)
    configs = a.configs or EXPERIMENTS[a.cmd]["configs"]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    sweep = Sweep(f"{NAME}_{a.cmd}", s)
    sweep.meta["command"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    info = teacher_info()
    code = code_state()
    xtr, ytr, xte, yte = data(s["train_subset"])
    teacher = load_teacher(TEACHER).eval()
    c0 = time.process_time()
    train_logits = batched(teacher, xtr)[0]
    test_logits = batched(teacher, xte)[0]
    cache_cpu = time.process_time() - c0
    # no augmentation: every training image is returned as is, so one set of logits serves (index 0)
    train_ds = FlipImages(xtr, ytr, hflip=s["hflip"], logits=(train_logits,))
    test_ds = FlipImages(xte, yte)
    sweep.extra["teacher"] = {
        "name": TEACHER, "arch": info["arch"], "epochs": info["epochs"], "params": info["params"],
        "saved_test_accuracy": info["accuracy"],
        "test_accuracy": float((test_logits.argmax(1) == yte).float().mean()),
        "train_subset_accuracy": float((train_logits.argmax(1) == ytr).float().mean()),
        "logit_cache_cpu_s": cache_cpu, "train_time_s": info.get("train_seconds"),
    }
    sweep.extra["student_params"] = count_parameters(make_student(s, 0))
    sweep.save()
    log.info("teacher %s: %.2f%% test; student %s params %d", TEACHER, 100 * sweep.extra["teacher"]["test_accuracy"],
             s["student"], sweep.extra["student_params"])
    for seed in a.seeds:
        for key in configs:
            if sweep.get(key, seed):
                continue
            method, kw, _ = CONFIGS[key]
            args = make_args(str(WORK / a.cmd / f"{key}_s{seed}"), method, s["epochs"], seed, s["lr"], batch=s["batch"],
                             weight_decay=s["weight_decay"], warmup_steps=s["warmup"], **kw)
            counter = CallCounter(teacher)
            res = train_eval(make_student(s, seed), None if method == "supervised" else teacher, args, train_ds,
                             test_ds)
            counter.remove()
            if counter.n:
                raise RuntimeError(f"the teacher ran {counter.n} times although its logits were in every batch")
            res["teacher_forward_calls"] = counter.n
            res["code"] = code
            res["distill"] = {"distill_method": method, **kw}
            if method != "supervised":
                res["distill"]["temperature"] = args.temperature
            if method == "kd":
                res["distill"].update(alpha=args.alpha, distill_loss=args.distill_loss)
            sweep.add(key, seed, res)
    log.info("%s: %d runs in the file", sweep.name, len(sweep.runs))


# ============================================================================ torchdistill: losses
IO = dict(student_module_path=".", student_module_io="output", teacher_module_path=".", teacher_module_io="output")


def td_loss(key: str, **kw):
    from torchdistill.losses.registry import get_mid_level_loss

    return get_mid_level_loss({"key": key, "kwargs": dict(IO, **kw)})


def mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """megvii-research/mdistiller ``mdistiller/distillers/DKD.py`` ``dkd_loss`` (commit a08d46f),
    verbatim but for ``size_average=False`` written as ``reduction="sum"``."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1, 1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.reshape(-1, 1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature ** 2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * (temperature ** 2) / target.shape[0]
    return alpha * tckd_loss + beta * nckd_loss


def authors_dist(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    """hunto/image_classification_sota ``lib/models/losses/dist_kd.py`` ``DIST.forward`` (verbatim math)."""
    def cosine_similarity(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    return (beta * tau ** 2 * inter_class_relation(y_s, y_t)
            + gamma * tau ** 2 * inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1)))


def hf_args(out: str, method: str, **kw):
    from hf_distill import DistillationTrainingArguments

    base = dict(output_dir=out, distill_method=method, use_cpu=True, report_to=[], learning_rate=1e-3,
                per_device_train_batch_size=1, save_strategy="no", eval_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, seed=0, data_seed=0, max_steps=10, lr_scheduler_type="constant",
                max_grad_norm=1.0, eval_teacher=False)
    base.update(kw)
    return DistillationTrainingArguments(**base)


def hf_trainer(student, teacher, batches, method: str, out: str, **kw):
    import _bench_common as C

    from hf_distill import DistillationTrainer

    return DistillationTrainer(model=student, teacher_model=teacher, args=hf_args(out, method, max_steps=len(batches), **kw),
                               train_dataset=C.BatchDataset(batches), data_collator=C.first_of)


def hf_first_loss(trainer, batch) -> tuple[float, dict]:
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), {k: float(v) for k, v in trainer.last_loss_terms.items()}


def pair_and_batches(n_batches: int, batch_size: int = 128, seed: int = 5):
    """The item-1 pair (trained resnet18 teacher, thin-deep student at init, seed 0) and real
    Fashion-MNIST batches from the 10k training subset (random draw, fixed seed)."""
    xtr, ytr, _, _ = data(COMMON["train_subset"])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ytr), generator=g)[: n_batches * batch_size].view(n_batches, batch_size)
    batches = [{"pixel_values": xtr[i].contiguous(), "labels": ytr[i].contiguous()} for i in idx]
    return load_teacher(TEACHER).eval(), thin_deep_student(0), batches


def td_box(student, teacher, batches, criterion_terms: dict):
    """torchdistill ``DistillationBox`` (its ``train_one_epoch`` convention) with ``WeightedSumLoss``
    over ``criterion_terms``; the optimizer the Trainer builds, lr 1e-3, weight decay 0, clip 1.0."""
    import _bench_common as C
    from bench_speed import _TD_COLLATE, StackedBatches, _td_register
    from torchdistill.core.distillation import get_distillation_box

    _td_register()
    cls, kwargs = C.trainer_optimizer_kwargs()
    loader = {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": None},
              "kwargs": {"batch_size": 1, "num_workers": 0, "drop_last": False}, "collate_fn": _TD_COLLATE}
    config = {
        "num_epochs": 1, "train_data_loader": loader,
        "optimizer": {"key": cls.__name__, "kwargs": dict(kwargs, lr=1e-3, weight_decay=0.0), "max_grad_norm": 1.0},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "frozen_modules": [],
                    "requires_grad": True},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": criterion_terms}},
    }
    # torchdistill never switches the teacher to eval mode: hand it over in eval mode
    return get_distillation_box(teacher.eval(), student, {"train": StackedBatches(batches)}, config,
                                torch.device("cpu"), None, False, 1)


def td_ce_term(weight: float = 1.0) -> dict:
    return {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
            "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                "target": {"uses_label": True}}},
            "weight": weight}


def td_dist_terms(beta=1.0, gamma=1.0, tau=1.0, weight=2.0, ce_weight=1.0) -> dict:
    return {"ce": td_ce_term(ce_weight),
            "dist": {"criterion": {"key": "DISTLoss", "kwargs": dict(IO, beta=beta, gamma=gamma, tau=tau)},
                     "weight": weight}}


def td_ls_terms(temperature=2.0, alpha=0.9) -> dict:
    # torchdistill's alpha weighs the label CE and beta the (T^2-scaled) soft term
    return {"ls": {"criterion": {"key": "LogitStdKDLoss", "kwargs": dict(
        IO, temperature=temperature, alpha=1.0 - alpha, beta=alpha, reduction="batchmean")}, "weight": 1.0}}


def row(case: str, hf: float, td: float, note: str = "") -> dict:
    return {"case": case, "hf_distill": hf, "reference": td, "abs_diff": abs(hf - td),
            "rel_diff": abs(hf - td) / max(abs(td), 1e-12), "note": note}


def cmd_losses(a) -> None:
    import torchdistill

    from hf_distill.losses import dist_terms, soft_kl

    torch.set_num_threads(1)
    teacher, student, batches = pair_and_batches(1)
    batch = batches[0]
    x, y = batch["pixel_values"], batch["labels"]
    out = str(WORK / "losses")
    rows = []
    # ---------------------------------------------------------------- function level, the same logits
    # the trainer's own loss on the batch; the same student weights in train mode give the same logits
    with torch.no_grad():
        zt = teacher(x)
        zs = copy.deepcopy(student).train()(x)
    S, T_ = {".": {"output": zs}}, {".": {"output": zt}}
    ce = F.cross_entropy(zs, y)

    def hf(method, **kw):
        trainer = hf_trainer(copy.deepcopy(student), teacher, batches, method, out, **kw)
        value, terms = hf_first_loss(trainer, batch)
        del trainer
        gc.collect()
        return value, terms

    v, terms = hf("dist")
    rows.append(row("DIST defaults (beta=gamma=1, T=1): CE + 2 * DISTLoss", v,
                    float(ce + 2.0 * td_loss("DISTLoss", beta=1.0, gamma=1.0, tau=1.0)(S, T_))))
    rows.append(row("DIST inter-class term alone", terms["loss_inter"],
                    float(td_loss("DISTLoss", beta=1.0, gamma=0.0, tau=1.0)(S, T_))))
    rows.append(row("DIST intra-class term alone", terms["loss_intra"],
                    float(td_loss("DISTLoss", beta=0.0, gamma=1.0, tau=1.0)(S, T_))))
    v, _ = hf("dist", temperature=4.0, dist_beta=1.0, dist_gamma=2.0, dist_weight=1.5, dist_ce_weight=0.5)
    rows.append(row("DIST T=4, beta=1, gamma=2, weight 1.5, CE 0.5", v,
                    float(0.5 * ce + 1.5 * td_loss("DISTLoss", beta=1.0, gamma=2.0, tau=4.0)(S, T_))))
    rows.append(row("same case, torchdistill's formula in float64", v, float(
        0.5 * ce.double() + 1.5 * td_loss("DISTLoss", beta=1.0, gamma=2.0, tau=4.0)(
            {".": {"output": zs.double()}}, {".": {"output": zt.double()}})),
        "float32 rounding: at T=4 the student's probabilities are near-uniform and centring them cancels digits"))
    rows.append(row("same case, the authors' formula (eps added to the product of norms) in float64", v,
                    float(0.5 * ce.double() + 1.5 * authors_dist(zs.double(), zt.double(), 1.0, 2.0, 4.0))))
    v, terms = hf("kd", temperature=2.0, alpha=0.9, logit_standardization=True)
    rows.append(row("KD + logit std., T=2, alpha=0.9 (torchdistill alpha=0.1, beta=0.9)", v,
                    float(td_loss("LogitStdKDLoss", temperature=2.0, alpha=0.1, beta=0.9)(S, T_, y))))
    rows.append(row("logit-std. soft term (torchdistill alpha=None returns KL without T^2: x T^2)", terms["loss_kd"],
                    float(td_loss("LogitStdKDLoss", temperature=2.0, beta=1.0)(S, T_, y)) * 4.0,
                    "torchdistill value multiplied by T^2 = 4"))
    v, _ = hf("kd", temperature=2.0, alpha=9.0 / 9.5, logit_standardization=True)
    rows.append(row("torchdistill's sample config (alpha=0.5 CE, beta=9, T=2) = hf alpha 9/9.5, total x 9.5", 9.5 * v,
                    float(td_loss("LogitStdKDLoss", temperature=2.0, alpha=0.5, beta=9.0)(S, T_, y)),
                    "hf_distill total multiplied by 9.5"))
    v, terms = hf("dkd", dkd_warmup_epochs=0.0)
    rows.append(row("DKD defaults (alpha 1, beta 8, T 4; no warm-up): CE + mdistiller dkd_loss", v,
                    float(ce + mdistiller_dkd_loss(zs, zt, y, 1.0, 8.0, 4.0)),
                    "reference: verbatim copy of the authors' function (torchdistill has no DKD)"))
    # pure functions on confident synthetic logits (the trainer calls these functions)
    g = torch.Generator().manual_seed(0)
    zs2, zt2 = torch.randn(128, 10, generator=g) * 4, torch.randn(128, 10, generator=g) * 8
    S2, T2 = {".": {"output": zs2}}, {".": {"output": zt2}}
    inter, intra = dist_terms(zs2, zt2, 1.0)
    rows.append(row("synthetic confident logits (teacher std 8): DIST terms, T=1", float(inter + intra),
                    float(td_loss("DISTLoss", beta=1.0, gamma=1.0, tau=1.0)(S2, T2))))
    rows.append(row("synthetic confident logits: logit-std. soft term, T=2", float(soft_kl(zs2, zt2, 2.0, True)),
                    float(td_loss("LogitStdKDLoss", temperature=2.0, beta=1.0)(S2, T2)) * 4.0,
                    "torchdistill value multiplied by T^2 = 4"))
    # ---------------------------------------------------------------- pipeline: Trainer vs DistillationBox
    pipeline = []
    for case, method, kw, terms_fn in (
        ("DIST defaults", "dist", {}, lambda: td_dist_terms()),
        ("KD + logit std., T=2, alpha=0.9", "kd", dict(temperature=2.0, alpha=0.9, logit_standardization=True),
         lambda: td_ls_terms(2.0, 0.9)),
    ):
        hf_v, _ = hf(method, **kw)
        box = td_box(copy.deepcopy(student), copy.deepcopy(teacher), batches, terms_fn())
        box.pre_epoch_process(epoch=0)
        td_v = float(box.forward_process(x, y, {}).detach())
        del box
        pipeline.append(row(f"first batch, same initial weights: {case}", hf_v, td_v,
                            "DistillationTrainer.compute_loss vs DistillationBox.forward_process"))
    result = {"torchdistill": torchdistill.__version__, "batch": {"size": len(y), "source": "10k training subset, seed 5"},
              "student": "thin_deep_student(0) at init (train mode)", "teacher": TEACHER, "function_rows": rows,
              "pipeline_rows": pipeline, "environment": environment(), "git": git_state(),
              "process_cpu_s": time.process_time(),
              "command": " ".join([Path(sys.executable).as_posix(), *sys.argv])}
    save_td("losses", result)
    for r in rows + pipeline:
        print(f"{r['case']}: hf {r['hf_distill']:.8f} ref {r['reference']:.8f} rel {r['rel_diff']:.1e}")


def save_td(key: str, value: dict) -> None:
    old = json.loads(TD_FILE.read_text()) if TD_FILE.exists() else {}
    old[key] = value
    TD_FILE.write_text(json.dumps(old, indent=1, default=str))


# ============================================================================ torchdistill: timing
def machine_snapshot() -> dict:
    """Load average and the processes using CPU right now (what else was running)."""
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    top = [line[:160] for line in ps.splitlines()[1:9]]
    return {"loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "top_processes": top}


def cmd_timing(a) -> None:
    import _bench_common as C
    import torchdistill
    from bench_speed import now, steady_per_step, step_clock_callback

    before = machine_snapshot()
    malloc = C.tune_malloc("steady")
    C.trainer_optimizer_kwargs()
    torch.set_num_threads(1)
    teacher, student, batches = pair_and_batches(a.steps)
    out = str(WORK / "timing")

    class HF:
        library = "hf_distill"

        def __init__(self, s, t):
            self.marks = []
            self.trainer = hf_trainer(s, t, batches, "dist", out)
            self.trainer.add_callback(step_clock_callback(self.marks))

        def first_loss(self):
            return hf_first_loss(self.trainer, batches[0])[0]

        def run(self):
            self.trainer.train()
            return steady_per_step([m for k, m in self.marks if k == "step"])

    class TD:
        library = "torchdistill"

        def __init__(self, s, t):
            self.box = td_box(s, t, batches, td_dist_terms())

        def first_loss(self):
            self.box.pre_epoch_process(epoch=0)
            return float(self.box.forward_process(batches[0]["pixel_values"], batches[0]["labels"], {}).detach())

        def run(self):
            box = self.box
            box.pre_epoch_process(epoch=0)
            marks = []
            for sample_batch, targets, supp_dict in box.train_data_loader:
                loss = box.forward_process(sample_batch, targets, supp_dict)
                box.post_forward_process(loss=loss)
                loss.item()
                marks.append(now())
            box.post_epoch_process()
            return steady_per_step(marks)

    factories = {"hf_distill": HF, "torchdistill": TD}
    losses = {}
    for name, f in factories.items():
        with torch.no_grad():
            losses[name] = f(C.fresh(student), C.fresh(teacher)).first_loss()
    times = {c: {n: [] for n in factories} for c in ("wall", "cpu")}
    order = list(factories)
    t0 = time.perf_counter()
    for rep in range(a.reps + 1):  # rep 0 untimed (warm-up)
        for name in order:
            runner = factories[name](C.fresh(student), C.fresh(teacher))
            w, c = runner.run()
            if rep:
                times["wall"][name].append(w)
                times["cpu"][name].append(c)
            del runner
            gc.collect()
        order = order[::-1]
        log.info("rep %d: cpu ms/step %s", rep, {n: round(1e3 * v[-1], 1) if v else None for n, v in times["cpu"].items()})
    summary = {clock: C.summarize(t, "torchdistill") for clock, t in times.items()}
    after = machine_snapshot()
    result = {"torchdistill": torchdistill.__version__, "steps_per_rep": a.steps, "reps": a.reps, "batch_size": 128,
              "pair": f"{TEACHER} (live, eval mode) -> thin_deep_student(0), 28x28 grey",
              "loss": "CE + 2 * (inter + intra), beta = gamma = 1, T = 1", "lr": 1e-3, "max_grad_norm": 1.0,
              "first_losses": losses, "times": times, "summary": summary, "machine_before": before,
              "machine_after": after, "allocator": malloc, "wall_s": time.perf_counter() - t0,
              "process_cpu_s": time.process_time(),
              "environment": environment(), "git": git_state(),
              "command": " ".join([Path(sys.executable).as_posix(), *sys.argv])}
    save_td("timing", result)
    print(json.dumps({k: result[k] for k in ("first_losses", "machine_before", "machine_after")}, indent=1))
    for clock in ("cpu", "wall"):
        s = summary[clock]
        print(clock, {n: round(v["median_ms"], 1) for n, v in s.items()}, "hf/td paired median ratio",
              round(s["hf_distill"]["median_paired_ratio"], 3))


# ============================================================================ report
def load_sweep(exp: str) -> Sweep | None:
    path = RESULTS_DIR / f"{NAME}_{exp}.json"
    if not path.exists():
        return None
    return Sweep(f"{NAME}_{exp}", settings_of(exp))


def pts(d: dict[int, float]) -> str:
    m, s = mean_std(100 * v for v in d.values())
    return f"{m:.2f} ± {s:.2f}"


def seeds_cell(d: dict[int, float]) -> str:
    return ", ".join(f"{k}: {100 * v:.2f}" for k, v in d.items())


def paired_cell(a: dict, b: dict) -> str:
    if not a or not b or a is b:
        return "-"
    per, ms, wins = paired(a, b)
    return f"{ms} ({per}; {wins})"


def complete(sweep: Sweep, key: str) -> dict[int, float]:
    return sweep.values(key)


def best_kd(sweep: Sweep) -> str | None:
    grid = [kd_key(t, a) for t, a in KD_GRID]
    present = [k for k in grid if sweep.values(k)]
    if not present:
        return None
    n = max(len(sweep.values(k)) for k in present)
    present = [k for k in present if len(sweep.values(k)) == n] or present
    return max(present, key=lambda k: mean_std(sweep.values(k).values())[0])


def accuracy_table(sweep: Sweep, configs: list[str], heads: bool = False) -> list[str]:
    alone = sweep.values("alone")
    best = best_kd(sweep)
    best_vals = sweep.values(best) if best else {}
    headers = ["configuration", "n", "test accuracy % (mean ± std)", "per seed (seed: %)",
               "vs alone, points: mean ± std (per seed; wins/n)"]
    if best:
        headers.append(f"vs best KD ({CONFIGS[best][2]}), points")
    if heads:
        headers += ["class head % (mean ± std)", "distillation head % (mean ± std)"]
    headers.append("train CPU s / run")
    rows = []
    for key in configs:
        vals = sweep.values(key)
        if not vals:
            continue
        label = CONFIGS[key][2] + (" **(best KD by mean)**" if key == best else "")
        r = [label, len(vals), pts(vals), seeds_cell(vals), "-" if key == "alone" else paired_cell(vals, alone)]
        if best:
            r.append("-" if key == best or key == "alone" else paired_cell(vals, best_vals))
        if heads:
            r += [pts(sweep.values(key, metric="eval_cls_head_accuracy")),
                  pts(sweep.values(key, metric="eval_dist_head_accuracy"))]
        runs = [x for x in sweep.runs if x["config"] == key]
        r.append(f"{sum(x['train_cpu_s'] for x in runs) / len(runs):.0f}")
        rows.append(r)
    return md_table(headers, rows)


def loss_table(sweep: Sweep, configs: list[str]) -> list[str]:
    rows = []
    for key in configs:
        runs = [x for x in sweep.runs if x["config"] == key]
        if not runs:
            continue
        last = {}
        for x in runs:
            for k, v in (x["loss_log"][-1] if x["loss_log"] else {}).items():
                if k.startswith("loss"):
                    last.setdefault(k, []).append(v)
        mid = [x["loss_log"][len(x["loss_log"]) // 2]["loss"] for x in runs if x["loss_log"]]
        rows.append([CONFIGS[key][2], f"{sum(mid) / len(mid):.4f}",
                     ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in last.items()),
                     f"{sum(x['metrics']['eval_loss'] for x in runs) / len(runs):.4f}"])
    return md_table(["configuration", "training loss at mid-run", "loss terms at the last logging step (mean over "
                     "seeds)", "test CE (eval_loss)"], rows)


def teacher_line(sweep: Sweep) -> str:
    t = sweep.extra.get("teacher", {})
    return (f"Teacher `{t.get('name')}`: timm {t.get('arch')}, {t.get('params', 0):,} parameters, {t.get('epochs')} "
            f"epochs on the 60k training images (`bench_quality.py teacher`), test accuracy "
            f"{100 * t.get('test_accuracy', float('nan')):.2f}% (accuracy on the 10k training subset "
            f"{100 * t.get('train_subset_accuracy', float('nan')):.2f}%).")


def code_line(sweep: Sweep) -> str:
    """Which library code the runs trained with (runs from before per-run records: the sweep's first invocation)."""
    states = {}
    for r in sweep.runs:
        c = r.get("code") or {**sweep.meta["git"], "hf_distill_sha256": "not recorded"}
        dirty = len(c.get("dirty_library_files", []))
        states.setdefault((c["commit"][:7], dirty, c["hf_distill_sha256"]), []).append(f"{r['config']}/{r['seed']}")
    return "Library code per run: " + "; ".join(
        f"git `{commit}`" + (f" + {dirty} uncommitted library files" if dirty else " (clean)")
        + f", source hash `{sha}`: {len(runs)} runs" for (commit, dirty, sha), runs in states.items()) + "."


def sweep_cpu(sweep: Sweep) -> tuple[float, float]:
    inv = sweep.meta.get("invocations", {}).values()
    return sum(v["cpu_s"] for v in inv), sum(v["wall_s"] for v in inv)


def cmd_report(a) -> None:
    sweeps = {e: load_sweep(e) for e in EXPERIMENTS}
    td = json.loads(TD_FILE.read_text()) if TD_FILE.exists() else {}
    md = ["# Logit distillation: KD grid, DKD, DIST, logit standardisation, hard and DeiT-token distillation "
          "(Fashion-MNIST, CPU)", "",
          "Issue 16, \"Measured, in benchmarks\". Script: `benchmarks/bench_logit.py` (exact commands in its "
          "docstring). All seeds run are reported; mean ± sample std over seeds; paired differences are per seed "
          "(same seed = same student initialisation and data order), in accuracy points, with the number of seeds "
          "where the first configuration is better.", "",
          "Common to items 1-3: the FitNets benchmark's data and budget (`bench_quality.py fitnets`): a stratified "
          "subset of 10,000 Fashion-MNIST training images (28x28 grey, the same for every run), no augmentation, "
          "20 epochs (1,580 steps), batch 128, AdamW lr 2e-3, weight decay 0.05, cosine schedule with 3% warm-up, "
          "gradient clipping 1.0 (Trainer default); one evaluation on the full 10,000-image test set at the end. "
          "The teacher's logits come from a cache of its exact eval-mode outputs on the training tensors "
          "(`teacher_logits` in each batch); a forward hook counted 0 teacher calls in every run.", ""]
    total_cpu = total_wall = 0.0
    sections = [("main", "1. Thin-deep student (1.10M parameters), resnet18 teacher (11.2M)", False),
                ("strong", "2. Much stronger teacher: tiny CNN student (c1=4, c2=8)", False),
                ("deit", "3. DeiT distillation-token student (timm deit_tiny_distilled, 28 px, patch 4)", True)]
    for exp, title, heads in sections:
        sweep = sweeps[exp]
        if sweep is None or not sweep.runs:
            continue
        cpu, wall = sweep_cpu(sweep)
        total_cpu, total_wall = total_cpu + cpu, total_wall + wall
        configs = [c for c in EXPERIMENTS[exp]["configs"] if sweep.values(c)]
        configs += sorted({r["config"] for r in sweep.runs} - set(configs))
        md += [f"## {title}", "", teacher_line(sweep) + f" Student: {sweep.extra.get('student_params', 0):,} "
               "parameters.", ""]
        md += accuracy_table(sweep, configs, heads) + [""]
        md += ["Training loss (convergence check):", ""] + loss_table(sweep, configs) + [""]
        md += [f"Sweep: `{sweep.name}.json`; {cpu / 60:.1f} min CPU, {wall / 60:.1f} min wall summed over "
               f"{len(sweep.meta.get('invocations', {}))} process invocations; commands: "
               + "; ".join(f"`{c}`" for c in dict.fromkeys(v.get("command") for v in sweep.meta["invocations"].values()
                                                           if v.get("command"))) + ".", "", code_line(sweep), ""]
    if "losses" in td:
        L = td["losses"]
        md += ["## 4. Losses against torchdistill " + L["torchdistill"], "",
               f"One batch of {L['batch']['size']} real training images; the thin-deep student at initialisation "
               "(train mode) and the trained resnet18 teacher (eval mode). hf_distill's value is the "
               "`DistillationTrainer.compute_loss` of the batch (its logged terms for single terms); torchdistill's "
               "is its registered mid-level loss called on the same logits "
               "(`get_mid_level_loss({'key': ..., 'kwargs': ...})(student_io, teacher_io[, targets])`), with the "
               "label CE added by hand where torchdistill's loss has none. Weights aligned as stated per row.", ""]
        md += md_table(["case", "hf_distill", "reference", "abs diff", "rel diff", "note"],
                       [[r["case"], f"{r['hf_distill']:.8f}", f"{r['reference']:.8f}", f"{r['abs_diff']:.1e}",
                         f"{r['rel_diff']:.1e}", r["note"]] for r in L["function_rows"] + L["pipeline_rows"]])
        md += ["", "torchdistill calling conventions met here: `LogitStdKDLoss` returns the KL **without** T^2 when "
               "`alpha` is None (rows marked x T^2), and needs `beta` given explicitly then; its `alpha` weighs the "
               "label CE and `beta` the T^2-scaled soft term, i.e. hf_distill `alpha` = torchdistill `beta` when "
               "`alpha + beta = 1`. `DISTLoss` uses `F.cosine_similarity` (eps on each norm), hf_distill (as the "
               "authors) adds eps to the product of norms: equal unless a centred probability vector is ~0.", ""]
    if "timing" in td:
        T = td["timing"]
        s = T["summary"]
        md += ["## 4b. DIST step time: hf_distill / torchdistill", "",
               f"Pair: {T['pair']}; batch {T['batch_size']}; loss {T['loss']}; AdamW lr {T['lr']}, gradient clipping "
               f"{T['max_grad_norm']}; live teacher in both. hf_distill: `DistillationTrainer.train()` over "
               f"{T['steps_per_rep']} pre-collated batches; torchdistill: `DistillationBox` with "
               "`WeightedSumLoss{ce: CrossEntropyLoss 1.0, dist: DISTLoss(beta=1, gamma=1, tau=1) 2.0}`, its "
               "`train_one_epoch` loop (forward_process + post_forward_process). Steady state per step (step 1 "
               f"left out), {T['reps']} timed repetitions after one untimed, the two libraries alternating (order "
               "reversed every repetition), 1 torch thread, fresh copies of the same initial weights each time. "
               f"First-batch losses: hf_distill {T['first_losses']['hf_distill']:.6f}, torchdistill "
               f"{T['first_losses']['torchdistill']:.6f}.", ""]
        md += md_table(["library", "CPU ms / step (median; min-max)", "wall ms / step (median)",
                        "ratio hf_distill / torchdistill (median of paired repetitions)"],
                       [[n, f"{s['cpu'][n]['median_ms']:.1f} ({s['cpu'][n]['min_ms']:.1f}-{s['cpu'][n]['max_ms']:.1f})",
                         f"{s['wall'][n]['median_ms']:.1f}",
                         (f"CPU {s['cpu'][n]['median_paired_ratio']:.3f}, wall {s['wall'][n]['median_paired_ratio']:.3f}"
                          if n == "hf_distill" else "1")] for n in ("hf_distill", "torchdistill")])
        b, e = T["machine_before"], T["machine_after"]
        md += ["", f"Machine load average (1/5/15 min) before {' / '.join(f'{v:.2f}' for v in b['loadavg'])}, after "
               f"{' / '.join(f'{v:.2f}' for v in e['loadavg'])} ({T['wall_s']:.0f} s of timing). Other processes using "
               "CPU at the start: " + "; ".join(f"`{p.strip()}`" for p in b["top_processes"][:4]) + ". "
               + (a.timing_note or ""), ""]
    envs = [sw.meta["environment"] for sw in sweeps.values() if sw is not None]
    if envs:
        e = envs[0]
        md += ["## Environment and total cost", "",
               f"CPU only, {e['nproc']} cores shared with another engineer's test runs; 1 torch thread per process "
               f"(`OMP_NUM_THREADS=1`), at most two benchmark processes at once; python {e['python']}, torch "
               f"{e['torch']}, timm {e['timm']}, transformers {e['transformers']}; hf_distill at git "
               f"{sweeps['main'].meta['git']['commit'][:10] if sweeps.get('main') else '?'}. CPU seconds are "
               "`time.process_time()`; wall times depend on the other jobs.",
               "", f"Accuracy sweeps: {total_cpu / 60:.1f} min CPU ({total_wall / 60:.1f} min wall summed over "
               f"processes). {a.extra_cost or ''}", ""]
    (RESULTS_DIR / f"{NAME}.md").write_text("\n".join(md))
    print("\n".join(md))


# ============================================================================ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for exp in EXPERIMENTS:
        s = sub.add_parser(exp, help=f"accuracy sweep {exp}")
        s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        s.add_argument("--configs", nargs="+", default=None,
                       help=f"configurations (default {' '.join(EXPERIMENTS[exp]['configs'])})")
    sub.add_parser("losses", help="loss values against torchdistill (run with the torchdistill venv's python)")
    t = sub.add_parser("timing", help="DIST step time against torchdistill (torchdistill venv)")
    t.add_argument("--steps", type=int, default=8, help="steps per repetition, the first untimed")
    t.add_argument("--reps", type=int, default=9, help="timed repetitions per library")
    r = sub.add_parser("report", help="write results/bench_logit.md from the JSON files")
    r.add_argument("--timing_note", default="", help="what else was running during the timing, in words")
    r.add_argument("--extra_cost", default="", help="other CPU cost to state (teacher training, torchdistill runs)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    setup_logging()
    if a.cmd in EXPERIMENTS:
        cmd_sweep(a)
    else:
        {"losses": cmd_losses, "timing": cmd_timing, "report": cmd_report}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
