"""Quality benchmarks of hf_distill on Fashion-MNIST (offline, CPU).

Subcommands (run in this order; ``fitnets`` and ``noisy`` may run concurrently once the
teachers exist)::

    python benchmarks/bench_quality.py teacher   # train + save the teachers (reused when present)
    python benchmarks/bench_quality.py fitnets   # thin-deep student: scratch vs KD vs FitNets+KD
    python benchmarks/bench_quality.py noisy     # small student: alone vs MSE-KD vs noisy teacher vs 3 teachers

Each student subcommand writes ``benchmarks/results/<name>.md`` (tables: mean ± std over seeds,
every seed's value, wall time per run, parameters) and ``benchmarks/results/<name>.json``
(every run's raw numbers). Runs already in the JSON are not run again (delete it to start over).

Every run uses ``DistillationTrainer`` with ``eval_strategy="no"`` and one ``evaluate()`` on the
full 10,000-image test set at the end. All seeds given are reported, whichever way they go.

Speed-up used for runs that need only the teacher's *logits* (KD, noisy teacher, several
teachers): the frozen teacher's logits on every train/test image are computed once (eval mode,
the exact tensors the trainer feeds it) and a :class:`CachedTeacher` module returns them by
looking the input image up. It is an ``nn.Module`` teacher like any other, so the trainer
applies noise, averaging and the loss exactly as with the live network; the script checks the
cached logits against the live teacher before each sweep. FitNets runs need the teacher's hidden
features and use the live teacher.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _method_bench import IMAGE_SIZE, FlipImages, data, git_state, make_timm, prepare  # noqa: E402
from fashion_mnist import CACHE_ROOT, MEAN, STD  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments, load_model  # noqa: E402
from hf_distill.models import count_parameters  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TEACHER_DIR = CACHE_ROOT / "teachers"
RUNS_DIR = CACHE_ROOT / "runs"

# name -> (timm architecture, seed, epochs). resnet18 is the main teacher; the two resnet10t
# (cheaper, different seeds) are the extra members of the multi-teacher comparison.
TEACHERS = {
    "resnet18_s0": ("resnet18", 0, 5),
    "resnet10t_s1": ("resnet10t", 1, 3),
    "resnet10t_s2": ("resnet10t", 2, 3),
}

log = logging.getLogger("bench")


# ============================================================================ models
def thin_deep_student(seed: int) -> nn.Module:
    """A FitNets-style student: a timm ResNet (BasicBlock) 4x thinner and deeper than resnet18.

    Deep stem (3x3 convs 8, 8, 16 channels), stages (16, 32, 64, 128) x 3 blocks: 28 weight
    layers on the main path (3 + 24 + fc) vs the teacher's 18 with (64, 128, 256, 512) x 2 blocks;
    ~1.10M parameters vs 11.2M.
    """
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [3, 3, 3, 3], num_classes=10, in_chans=1, stem_type="deep", stem_width=8,
                   channels=(16, 32, 64, 128))
    model.pretrained_cfg = {"architecture": "resnet28_thin", "input_size": (1, IMAGE_SIZE, IMAGE_SIZE),
                            "mean": (MEAN,), "std": (STD,), "num_classes": 10}
    return prepare(model)


class SmallCNN(nn.Module):
    """A small plain-PyTorch student: 2 conv blocks (c1, c2 channels) + linear head."""

    def __init__(self, c1: int = 8, c2: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * 7 * 7, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def small_cnn_student(seed: int, c1: int = 8, c2: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return prepare(SmallCNN(c1, c2))


class CachedTeacher(nn.Module):
    """A frozen teacher replayed from its precomputed logits, looked up by the exact input image.

    Inputs it has not seen (the trainer's dry probe on zeros) get NaN logits and are counted in
    ``misses``, so silent use of a wrong target is impossible.
    """

    def __init__(self, name: str, images: list[torch.Tensor], logits: list[torch.Tensor]):
        super().__init__()
        self.name = name
        x = torch.cat(images)
        self.register_buffer("table", torch.cat(logits).float(), persistent=False)
        self.index = {hash(x[i].numpy().tobytes()): i for i in range(len(x))}
        self.num_classes = self.table.shape[1]
        self.misses = 0
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a dtype
        prepare(self)

    def forward(self, x):
        rows = [self.index.get(hash(img.numpy().tobytes()), -1) for img in x.detach().cpu().float()]
        out = self.table[torch.tensor([max(r, 0) for r in rows])].clone()
        bad = torch.tensor([r < 0 for r in rows])
        if bad.any():
            self.misses += int(bad.sum())
            out[bad] = float("nan")
        return out


class TruncatedTeacher(nn.Module):
    """The live teacher's layers up to the hint layer (same module names) + its cached logits.

    For FitNets: the hint features are computed by the real teacher layers (so the trainer's
    forward hook on e.g. ``layer2`` sees exactly the teacher's hint), while the logits, which only
    the later layers would produce, come from the verified cache. Saves the teacher's later layers.
    """

    def __init__(self, live: nn.Module, cached: CachedTeacher, upto: str):
        super().__init__()
        names = [n for n, _ in live.named_children()]
        if upto not in names:
            raise ValueError(f"{upto} is not a top-level module of the teacher ({names})")
        self.order = names[:names.index(upto) + 1]
        for n in self.order:
            self.add_module(n, live.get_submodule(n))
        self.cached = cached
        self.num_classes = cached.num_classes
        prepare(self)

    def forward(self, x):
        h = x
        for n in self.order:
            h = getattr(self, n)(h)
        return self.cached(x)


def teacher_dir(name: str) -> Path:
    return TEACHER_DIR / name


def load_teacher(name: str) -> nn.Module:
    model = load_model(str(teacher_dir(name)))
    # The saved data config holds the spec; set it again so the comparison never depends on it.
    return prepare(model)


def cached_teacher(name: str) -> CachedTeacher:
    folder = teacher_dir(name)
    xtr, _, xte, _ = data(None)
    logits = torch.load(folder / "logits.pt")
    return CachedTeacher(name, [xtr, xte], [logits["train"], logits["test"]])


def check_cache(name: str, n: int = 256) -> float:
    """Largest |cached - live| logit difference on n train and n test images (must be ~1e-5)."""
    live = load_teacher(name).eval()
    cached = cached_teacher(name)
    xtr, _, xte, _ = data(None)
    g = torch.Generator().manual_seed(123)
    xs = torch.cat([xtr[torch.randperm(len(xtr), generator=g)[:n]], xte[:n]])
    with torch.no_grad():
        diff = (live(xs) - cached(xs)).abs().max().item()
    if not diff < 1e-3 or cached.misses:
        raise RuntimeError(f"cached logits of {name} do not match the live teacher (max diff {diff})")
    return diff


# ============================================================================ training
def make_args(out: str, method: str, epochs: float, seed: int, lr: float, batch: int = 128, **kw):
    return DistillationTrainingArguments(
        output_dir=out, distill_method=method, num_train_epochs=epochs, per_device_train_batch_size=batch,
        per_device_eval_batch_size=500, learning_rate=lr, weight_decay=kw.pop("weight_decay", 0.05),
        lr_scheduler_type="cosine", warmup_steps=kw.pop("warmup_steps", 0.03), logging_steps=50,
        eval_strategy="no", save_strategy="no", report_to=[], seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=True, **kw,
    )


def train_eval(student, teacher, args, train_ds, test_ds) -> dict:
    """Train, evaluate once on the test set; returns accuracy, wall time and the last train logs."""
    t0 = time.time()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_ds)
    trainer.train()
    train_s = time.time() - t0
    metrics = trainer.evaluate(eval_dataset=test_ds)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "teacher_accuracy": metrics.get("eval_teacher_accuracy"),
        "train_seconds": train_s,
        "wall_seconds": time.time() - t0,
        "steps": trainer.state.global_step,
        "first_log": logs[0] if logs else None,
        "last_log": logs[-1] if logs else None,
        "log_history": [h for h in trainer.state.log_history],
        "params": count_parameters(trainer.student),
        "_trainer": trainer,
    }


# ============================================================================ teacher
def cmd_teacher(a) -> None:
    names = a.only or list(TEACHERS)
    xtr, ytr, xte, yte = data(None)
    summary = {}
    for name in names:
        arch, seed, epochs = TEACHERS[name]
        folder = teacher_dir(name)
        info_path = folder / "bench_info.json"
        if info_path.exists() and (folder / "logits.pt").exists() and not a.force:
            summary[name] = json.loads(info_path.read_text())
            log.info("teacher %s present (%.2f%%), reused", name, 100 * summary[name]["accuracy"])
            continue
        epochs = a.epochs or epochs
        n = a.subset or len(ytr)
        train_ds = FlipImages(xtr[:n], ytr[:n], hflip=True)
        log.info("training teacher %s (%s, seed %d, %s epochs, %d images)", name, arch, seed, epochs, n)
        model = make_timm(arch, seed)
        args = make_args(str(RUNS_DIR / "teacher" / name), "supervised", epochs, seed, lr=2e-3)
        res = train_eval(model, None, args, train_ds, FlipImages(xte, yte))
        res.pop("_trainer").save_model(str(folder))  # native timm folder + model card
        model.eval()
        with torch.no_grad():
            logits = {split: torch.cat([model(x[i:i + 1000]) for i in range(0, len(x), 1000)])
                      for split, x in (("train", xtr), ("test", xte))}
        torch.save(logits, folder / "logits.pt")
        acc_check = float((logits["test"].argmax(1) == yte).float().mean())
        info = {"name": name, "arch": arch, "seed": seed, "epochs": epochs, "train_images": n,
                "accuracy": res["accuracy"], "accuracy_from_saved_logits": acc_check,
                "train_accuracy": float((logits["train"].argmax(1) == ytr).float().mean()),
                "params": res["params"], "train_seconds": res["train_seconds"],
                "lr": 2e-3, "batch": 128, "augmentation": "random horizontal flip",
                "torch_threads": torch.get_num_threads()}
        info_path.write_text(json.dumps(info, indent=2))
        # reload check: hf_distill.load_model gives back the same network
        reloaded = load_teacher(name).eval()
        with torch.no_grad():
            diff = (reloaded(xte[:500]) - logits["test"][:500]).abs().max().item()
        info["reload_max_logit_diff"] = diff
        info_path.write_text(json.dumps(info, indent=2))
        summary[name] = info
        log.info("teacher %s: %.2f%% test (%.0f s), reload diff %.2e", name, 100 * res["accuracy"],
                 res["train_seconds"], diff)
    if not a.only:
        write_teacher_md(summary)


def teacher_infos() -> dict:
    out = {}
    for name in TEACHERS:
        p = teacher_dir(name) / "bench_info.json"
        if p.exists():
            out[name] = json.loads(p.read_text())
    return out


def write_teacher_md(summary: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    lines = ["# Teachers (Fashion-MNIST, 28x28 grey, full 60k train, test on 10k)", "",
             "| teacher | arch | seed | epochs | params | test acc | train acc | train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, i in summary.items():
        lines.append(f"| {name} | {i['arch']} | {i['seed']} | {i['epochs']} | {i['params']:,} | "
                     f"{100 * i['accuracy']:.2f}% | {100 * i['train_accuracy']:.2f}% | {i['train_seconds']:.0f} |")
    lines += ["", "AdamW lr 2e-3, weight decay 0.05, cosine schedule, 3% warm-up, batch 128, random horizontal "
              "flips; `DistillationTrainer(distill_method=\"supervised\")`; saved with `trainer.save_model` under "
              f"`{TEACHER_DIR}` and reloaded with `hf_distill.load_model` (reloaded logits identical). Train "
              "times: 1 torch thread on a shared 2-core machine whose load average was 5-8 during training "
              "(other jobs), so about 2-3x slower than on an idle machine.", ""]
    (RESULTS_DIR / "teachers.md").write_text("\n".join(lines))
    (RESULTS_DIR / "teachers.json").write_text(json.dumps(summary, indent=2))


# ============================================================================ sweeps
class Sweep:
    """Runs (config, seed) pairs, keeping every result in a JSON file as it goes."""

    def __init__(self, name: str, meta: dict):
        self.name = name
        self.path = RESULTS_DIR / f"{name}.json"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        keep = old.get("meta", {}).get("settings") == meta.get("settings")
        self.runs = old.get("runs", []) if keep else []
        # one entry per invocation that ran something: when, with which library code, how long
        self.invocation = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_state(), "runs_added": 0,
                           "seconds": 0.0}
        self._t0 = time.time()
        self.meta = {**(old.get("meta", {}) if keep else {}), **meta}
        self.meta.setdefault("invocations", [])

    def done(self, config: str, seed: int) -> bool:
        return any(r["config"] == config and r["seed"] == seed for r in self.runs)

    def add(self, config: str, seed: int, result: dict) -> None:
        result = {"config": config, "seed": seed, "git_commit": self.invocation["git"]["commit"],
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
        self.runs.append(result)
        if self.invocation["runs_added"] == 0:
            self.meta["invocations"].append(self.invocation)
        self.invocation["runs_added"] += 1
        self.invocation["seconds"] = time.time() - self._t0
        self.save()
        log.info("%s | %-28s seed %d: %.2f%% (%.0f s)", self.name, config, seed, 100 * result["accuracy"],
                 result["wall_seconds"])

    def save(self) -> None:
        self.path.write_text(json.dumps({"meta": self.meta, "runs": self.runs}, indent=1, default=str))

    def table(self, configs: list[tuple[str, str]], baseline: str | None = None) -> list[str]:
        lines = ["| configuration | n | test accuracy mean ± std | Δ vs " + (baseline or "-") +
                 " | per-seed accuracy (seed: %) | wall s / run | student params |",
                 "|---|---|---|---|---|---|---|"]
        base = [r["accuracy"] for r in self.runs if r["config"] == baseline] if baseline else []
        for key, label in configs:
            rs = sorted([r for r in self.runs if r["config"] == key], key=lambda r: r["seed"])
            if not rs:
                continue
            acc = np.array([r["accuracy"] for r in rs]) * 100
            std = acc.std(ddof=1) if len(acc) > 1 else float("nan")
            delta = f"{acc.mean() - 100 * np.mean(base):+.2f}" if base and key != baseline else "-"
            seeds = ", ".join(f"{r['seed']}: {100 * r['accuracy']:.2f}" for r in rs)
            wall = np.mean([r["wall_seconds"] for r in rs])
            lines.append(f"| {label} | {len(rs)} | {acc.mean():.2f} ± {std:.2f} | {delta} | {seeds} | {wall:.0f} | "
                         f"{rs[0]['params']:,} |")
        return lines


def paired_lines(sweep: Sweep, pairs: list[tuple[str, str]]) -> list[str]:
    """Per-seed paired differences (same seed = same init and data order)."""
    lines = ["| comparison | per-seed difference (points) | mean | seeds better / total |", "|---|---|---|---|"]
    for a_key, b_key in pairs:
        a = {r["seed"]: r["accuracy"] for r in sweep.runs if r["config"] == a_key}
        b = {r["seed"]: r["accuracy"] for r in sweep.runs if r["config"] == b_key}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        d = [100 * (a[s] - b[s]) for s in seeds]
        lines.append(f"| {a_key} − {b_key} | {', '.join(f'{x:+.2f}' for x in d)} | {np.mean(d):+.2f} | "
                     f"{sum(x > 0 for x in d)}/{len(d)} |")
    return lines


def teacher_lines(names: list[str]) -> list[str]:
    infos = teacher_infos()
    lines = ["| teacher | arch | params | epochs | test accuracy |", "|---|---|---|---|---|"]
    for n in names:
        i = infos[n]
        lines.append(f"| {n} | {i['arch']} | {i['params']:,} | {i['epochs']} | {100 * i['accuracy']:.2f}% |")
    return lines


def code_line(sweep: Sweep) -> str:
    """Which library commit(s) the runs used (the library was being developed while they ran)."""
    commits = sorted({r.get("git_commit", "?")[:7] for r in sweep.runs})
    return "hf_distill code: commit " + ", ".join(f"`{c}`" for c in commits) + " (per run in the JSON)."


def env_line() -> str:
    return (f"Environment: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s) per process, CPU only; wall times are per run (train + final "
            "evaluation) on a shared 2-core machine, two benchmark processes at once, so they are indicative.")


# ---------------------------------------------------------------------------- FitNets
def cmd_fitnets(a) -> None:
    teacher_name = "resnet18_s0"
    settings = {"subset": a.subset, "epochs": a.epochs, "hint_epochs": a.hint_epochs, "lr": a.lr,
                "seeds": a.seeds, "hint_layers": a.hint_layers, "T": 4.0, "alpha": 0.9, "batch": 128}
    sweep = Sweep(a.name or "fitnets", {"settings": settings, "teacher": teacher_name})
    xtr, ytr, xte, yte = data(a.subset)
    train_ds, test_ds = FlipImages(xtr, ytr), FlipImages(xte, yte)
    log.info("cache check %s: max |cached - live| = %.2e", teacher_name, check_cache(teacher_name))
    live = load_teacher(teacher_name)
    cached = cached_teacher(teacher_name)
    hint_teacher_layer = a.hint_layers.split(":")[1]
    if a.live_teacher:
        truncated = live
    else:
        truncated = TruncatedTeacher(live, cached, hint_teacher_layer)
        with torch.no_grad():  # the truncated teacher's hint equals the live teacher's
            from hf_distill.models.taps import FeatureTaps

            x = xte[:64]
            with FeatureTaps(live.eval(), [hint_teacher_layer], detach=True) as taps:
                live(x)
                want = taps.pop()[hint_teacher_layer]
            with FeatureTaps(truncated.eval(), [hint_teacher_layer], detach=True) as taps:
                truncated(x)
                got = taps.pop()[hint_teacher_layer]
            assert torch.equal(want, got), "truncated teacher hint differs from the live teacher's"
    configs = [
        ("scratch", "supervised", None),
        ("kd", "kd", cached),
        ("fitnets_kd", "fitnets", truncated),
        # ablation: the same annealed KD stage without the hint stage (hint_epochs=0, hint_weight=0), so
        # fitnets_kd - kd_anneal is the effect of the hints alone
        ("kd_anneal", "fitnets", truncated),
    ]
    configs = [c for c in configs if c[0] in a.configs]
    for seed in a.seeds:
        for key, method, teacher in configs:
            if sweep.done(key, seed):
                continue
            kw = {}
            if method == "fitnets":
                kw = dict(hint_layers=[a.hint_layers], hint_epochs=a.hint_epochs if key == "fitnets_kd" else 0.0,
                          soft_weight_schedule="linear", soft_weight_start=4.0, soft_weight_end=1.0)
            args = make_args(str(RUNS_DIR / sweep.name / f"{key}_s{seed}"), method, a.epochs, seed, a.lr, **kw)
            res = train_eval(thin_deep_student(seed), teacher, args, train_ds, test_ds)
            res.pop("_trainer")
            res["teacher_logits"] = {id(cached): "cached", id(live): "live"}.get(id(teacher),
                                                                               "truncated+cached" if teacher else None)
            sweep.add(key, seed, res)
    for extra in a.merge or []:  # runs of the same settings kept in another results file (a parallel process)
        other = json.loads((RESULTS_DIR / f"{extra}.json").read_text())
        if other["meta"]["settings"] != settings:
            raise ValueError(f"{extra}.json was run with other settings: {other['meta']['settings']}")
        sweep.runs += [r for r in other["runs"] if not sweep.done(r["config"], r["seed"])]
        sweep.meta.setdefault("merged_from", []).append(f"{extra}.json")
    write_fitnets_md(sweep, teacher_name, settings)


def write_fitnets_md(sweep: Sweep, teacher_name: str, s: dict) -> None:
    student = thin_deep_student(0)
    lines = [
        "# FitNets vs KD vs training from scratch: a thin, deep student (Fashion-MNIST)", "",
        "Student: timm `ResNet(BasicBlock, [3, 3, 3, 3], stem_type=\"deep\", stem_width=8, "
        f"channels=(16, 32, 64, 128))`, 28 weight layers on the main path, {count_parameters(student):,} "
        "parameters — 1/4 of the teacher's width and deeper (28 vs 18 layers). Teacher:", "",
        *teacher_lines([teacher_name]), "",
        f"Data: stratified subset of {s['subset'] or 60000:,} training images (same subset for all runs), "
        "28x28 grey, no augmentation; test on the full 10,000-image test set. "
        f"Budget: {s['epochs']} epochs for every configuration, batch {s['batch']}, AdamW lr {s['lr']}, "
        "weight decay 0.05, cosine schedule with 3% warm-up. Seeds: " + ", ".join(map(str, s["seeds"])) +
        " (seed = student init + data order; all seeds run are reported).", "",
        "- **scratch**: `distill_method=\"supervised\"` (labels only).",
        f"- **kd**: `distill_method=\"kd\"`, T = {s['T']}, alpha = {s['alpha']} (defaults).",
        f"- **fitnets_kd**: `distill_method=\"fitnets\"`, `hint_layers=[\"{s['hint_layers']}\"]` (student "
        "middle stage 32ch 4x4 guided by the teacher's middle stage 128ch 4x4 through a 1x1 conv + BN "
        f"regressor), `hint_epochs={s['hint_epochs']}` (stage 1, hint loss only, layers up to the guided "
        f"one), then KD for the remaining {s['epochs'] - s['hint_epochs']:g} epochs with the soft term "
        "annealed linearly 4 -> 1 (`soft_weight_schedule=\"linear\"`, start 4, end 1), T = 4, alpha = 0.9. "
        "Same total epochs as the others.",
        "- **ablation: annealed KD, no hints**: the same run as fitnets_kd with `hint_epochs=0` and `hint_weight=0`: "
        f"{s['epochs']:g} epochs of KD whose soft term is annealed linearly 4 -> 1 (alpha = 0.9). FitNets differs "
        "from plain KD both by the hint stage and by this schedule; this run separates the two.", "",
        "## Test accuracy (%)", "",
        *sweep.table([("scratch", "scratch (supervised)"), ("kd", "KD"), ("fitnets_kd", "FitNets hints + KD"),
                      ("kd_anneal", "ablation: annealed KD, no hints")], baseline="scratch"), "",
        "## Paired per-seed differences", "",
        *paired_lines(sweep, [("kd", "scratch"), ("fitnets_kd", "scratch"), ("fitnets_kd", "kd"),
                              ("kd_anneal", "kd"), ("fitnets_kd", "kd_anneal")]), "",
        "## Convergence check (training loss, mean over seeds)", "",
        *convergence_lines(sweep, ["scratch", "kd", "fitnets_kd", "kd_anneal"]), "",
        f"Results files: `{sweep.name}.json`" + "".join(f", `{m}`" for m in sweep.meta.get("merged_from", [])) + ".",
        "",
        "KD runs read the teacher's logits from a cache of its exact outputs (see the module docstring); "
        "FitNets runs run the live teacher's layers up to the hint layer (checked equal to the full teacher's "
        "hint) and take its logits from the same cache, so their wall time includes part of the teacher's "
        "forward passes.", "",
        env_line(), "", code_line(sweep), "",
    ]
    (RESULTS_DIR / f"{sweep.name}.md").write_text("\n".join(lines))


def convergence_lines(sweep: Sweep, keys: list[str]) -> list[str]:
    lines = ["| configuration | loss terms at the last logging step | total training loss at 50% / 75% / 100% "
             "of the logged steps |", "|---|---|---|"]
    for key in keys:
        rs = [r for r in sweep.runs if r["config"] == key]
        if not rs:
            continue
        terms = {}
        for k in ("loss", "loss_ce", "loss_kd", "loss_mse", "loss_hint"):
            vals = [r["last_log"][k] for r in rs if r.get("last_log") and k in r["last_log"]]
            if vals:
                terms[k] = np.mean(vals)
        marks = []
        for frac in (0.5, 0.75, 1.0):
            vals = []
            for r in rs:
                logs = [h for h in r["log_history"] if "loss" in h]
                if logs:
                    vals.append(logs[min(len(logs) - 1, int(frac * len(logs)) - (1 if frac == 1.0 else 0))]["loss"])
            marks.append(f"{np.mean(vals):.4f}" if vals else "-")
        lines.append(f"| {key} | " + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()) + " | " + " / ".join(marks)
                     + " |")
    return lines


# ---------------------------------------------------------------------------- noisy teachers
def cmd_noisy(a) -> None:
    main_t, extra = "resnet18_s0", ["resnet10t_s1", "resnet10t_s2"]
    settings = {"subset": a.subset, "epochs": a.epochs, "lr": a.lr, "seeds": a.seeds, "c1": a.c1, "c2": a.c2,
                "sigmas": a.sigmas, "alpha": 0.9, "batch": 128}
    sweep = Sweep(a.name or "noisy", {"settings": settings, "teachers": [main_t, *extra]})
    xtr, ytr, xte, yte = data(a.subset)
    train_ds, test_ds = FlipImages(xtr, ytr), FlipImages(xte, yte)
    for n in [main_t, *extra]:
        log.info("cache check %s: max |cached - live| = %.2e", n, check_cache(n))
    t1 = cached_teacher(main_t)
    t3 = [t1] + [cached_teacher(n) for n in extra]
    configs = [("alone", "supervised", None, {})]
    configs.append(("mse_1t", "kd", t1, dict(distill_loss="mse")))
    for sigma in a.sigmas:
        configs.append((f"noisy_1t_s{sigma:g}", "noisy_teacher", t1, dict(teacher_noise_std=sigma)))
    configs.append(("mse_3t_mean", "kd", t3, dict(distill_loss="mse", teacher_ensemble="mean")))
    if a.noisy_ensemble:
        configs.append((f"noisy_3t_mean_s{a.sigmas[0]:g}", "noisy_teacher", t3,
                        dict(teacher_noise_std=a.sigmas[0], teacher_ensemble="mean")))
    for seed in a.seeds:
        for key, method, teacher, kw in configs:
            if sweep.done(key, seed):
                continue
            args = make_args(str(RUNS_DIR / sweep.name / f"{key}_s{seed}"), method, a.epochs, seed, a.lr, **kw)
            res = train_eval(small_cnn_student(seed, a.c1, a.c2), teacher, args, train_ds, test_ds)
            res.pop("_trainer")
            res["distill"] = {"distill_loss": args.distill_loss, "teacher_noise_std": args.teacher_noise_std,
                              "teacher_noise_prob": args.teacher_noise_prob, "alpha": args.alpha}
            sweep.add(key, seed, res)
    for t in t3:
        if t.misses > 0:
            log.info("cached teacher %s: %d lookups missed (the trainer's dry probe only)", t.name, t.misses)
    write_noisy_md(sweep, [main_t, *extra], settings, [c[0] for c in configs])


def write_noisy_md(sweep: Sweep, teachers: list[str], s: dict, keys: list[str]) -> None:
    student = small_cnn_student(0, s["c1"], s["c2"])
    s0 = s["sigmas"][0]
    labels = {"alone": "student alone (supervised)", "mse_1t": "1 teacher, MSE logit regression, no noise",
              "mse_3t_mean": "3 teachers (mean logits), MSE, no noise",
              f"noisy_3t_mean_s{s0:g}": f"3 teachers (mean), noisy sigma={s0:g}, alpha=0.5"}
    for sigma in s["sigmas"]:
        labels[f"noisy_1t_s{sigma:g}"] = f"1 teacher, noisy teacher sigma={sigma:g}, alpha=0.5"
    ens = sweep.runs and next((r["teacher_accuracy"] for r in sweep.runs if r["config"] == "mse_3t_mean"), None)
    lines = [
        "# Noisy teachers and several teachers (Fashion-MNIST)", "",
        f"Student: a small plain-PyTorch CNN (conv3x3 {s['c1']} -> BN -> ReLU -> pool, conv3x3 {s['c2']} -> BN -> "
        f"ReLU -> pool, linear), {count_parameters(student):,} parameters. Teachers:", "",
        *teacher_lines(teachers), "",
        (f"Mean-of-3 ensemble test accuracy (as the trainer reports it): {100 * ens:.2f}%." if ens else ""), "",
        f"Data: stratified subset of {s['subset'] or 60000:,} training images (the same for all runs), no "
        f"augmentation; test on the full 10,000 test images. Budget: {s['epochs']} epochs for every configuration, "
        f"batch {s['batch']}, AdamW lr {s['lr']}, weight decay 0.05, cosine schedule, 3% warm-up. Seeds: "
        + ", ".join(map(str, s["seeds"])) + " (all reported).", "",
        "- **alone**: `distill_method=\"supervised\"`.",
        "- **MSE, no noise**: `distill_method=\"kd\", distill_loss=\"mse\"` (L = 0.1 CE + 0.9 · ½‖z_s − z_t‖², "
        "alpha = 0.9), i.e. the noisy-teacher loss with the noise switched off.",
        "- **noisy**: `distill_method=\"noisy_teacher\"` (preset: MSE, sigma = 0.2, alpha(prob) = 0.5; the "
        "other sigma via `teacher_noise_std`), alpha = 0.9.",
        "- **3 teachers**: `teacher_model=[resnet18_s0, resnet10t_s1, resnet10t_s2]`, `teacher_ensemble=\"mean\"`.",
        "",
        "## Test accuracy (%)", "",
        *sweep.table([(k, labels.get(k, k)) for k in keys], baseline="alone"), "",
        "## Paired per-seed differences", "",
        *paired_lines(sweep, [("mse_1t", "alone")] + [(k, "mse_1t") for k in keys if k.startswith("noisy_1t")]
                      + [("mse_3t_mean", "mse_1t"), (f"noisy_3t_mean_s{s0:g}", "mse_3t_mean")]), "",
        "## Convergence check", "",
        *convergence_lines(sweep, keys), "",
        "Teacher logits are read from a cache of the frozen teachers' exact outputs (see the module "
        "docstring); noise, averaging and losses are applied by `DistillationTrainer` as with live teachers.", "",
        env_line(), "", code_line(sweep), "",
    ]
    (RESULTS_DIR / f"{sweep.name}.md").write_text("\n".join(lines))


# ============================================================================ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="train and save the teachers (reused when present)")
    t.add_argument("--only", nargs="*", choices=list(TEACHERS), help="train only these teachers")
    t.add_argument("--epochs", type=float, default=None, help="override the epochs (testing)")
    t.add_argument("--subset", type=int, default=None, help="train on the first N images (testing)")
    t.add_argument("--force", action="store_true", help="retrain even if saved")
    f = sub.add_parser("fitnets", help="thin-deep student: scratch vs KD vs FitNets stage-wise + KD")
    f.add_argument("--subset", type=int, default=10000, help="training images (stratified; default 10000)")
    f.add_argument("--epochs", type=float, default=20)
    f.add_argument("--hint_epochs", type=float, default=5, help="FitNets stage 1 epochs (default: 1/4 of 20)")
    f.add_argument("--hint_layers", default="layer2:layer2")
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    f.add_argument("--configs", nargs="+", default=["scratch", "kd", "fitnets_kd", "kd_anneal"],
                   help="configurations to run (default all: scratch kd fitnets_kd kd_anneal)")
    f.add_argument("--merge", nargs="*", help="also tabulate the runs of these results files (same settings)")
    f.add_argument("--live_teacher", action="store_true",
                   help="FitNets runs use the whole live teacher (default: its layers up to the hint + cached logits)")
    f.add_argument("--name", default=None, help="results name (default fitnets)")
    n = sub.add_parser("noisy", help="small student: alone vs MSE-KD vs noisy teacher vs several teachers")
    n.add_argument("--subset", type=int, default=5000, help="training images (stratified; default 5000)")
    n.add_argument("--epochs", type=float, default=30)
    n.add_argument("--lr", type=float, default=2e-3)
    n.add_argument("--c1", type=int, default=8)
    n.add_argument("--c2", type=int, default=16)
    n.add_argument("--sigmas", type=float, nargs="+", default=[0.2, 0.5])
    n.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    n.add_argument("--noisy_ensemble", action="store_true", help="also run 3 teachers (mean) with noise")
    n.add_argument("--name", default=None, help="results name (default noisy)")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("hf_distill").setLevel(logging.WARNING)
    t0 = time.time()
    {"teacher": cmd_teacher, "fitnets": cmd_fitnets, "noisy": cmd_noisy}[a.cmd](a)
    log.info("%s done in %.0f s", a.cmd, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
