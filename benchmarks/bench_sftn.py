"""SFTN (student-friendly teacher) vs a standard teacher, judged by the students they teach (Fashion-MNIST).

    python benchmarks/bench_sftn.py            # full run (~35-40 min of CPU at 1 thread)
    python benchmarks/bench_sftn.py --quick    # smoke run (a few minutes); writes bench_sftn_quick.*

Teachers (timm ``resnet18``, ``in_chans=1``, random init, seed 0), the same recipe and epochs:

* **standard**: ``distill_method="supervised"``;
* **SFTN**: ``distill_method="sftn", sftn_student_model=<the student's config folder>`` (defaults:
  branches after ``layer1..layer3``, lam_T = lam_KL = lam_CE = 1, T = 1). Saved with
  ``trainer.save_model`` and loaded back with ``hf_distill.load_model`` (like the standard one).

Student: a small transformers ``ResNetForImageClassification`` (basic blocks, widths 16/32/64/128,
one block per stage, ~0.3M parameters; the SFTN branches are built from the same config), trained
to the end of a cosine schedule, seeds 0, 1, 2 (seed = init + data order + flips):

* ``alone``: labels only (``supervised``);
* ``kd_standard`` / ``kd_sftn``: KD (T 4, alpha 0.9) from each teacher; the teacher's logits on every
  training image (plain and flipped) are computed once and read from the batch by the trainer;
* ``fitnets_standard`` / ``fitnets_sftn``: FitNets: hint ``resnet.encoder.stages.1:layer2`` (32ch 4x4 ->
  128ch 4x4, 1x1 conv regressor), stage 1 for ``hint_epochs`` epochs, then KD as above for the rest.
  The teacher is replayed from its cached logits and cached ``layer2`` output (checked equal to the
  live network), so each step does not pay a resnet18 forward.

Writes ``benchmarks/results/bench_sftn.md`` and ``.json`` (a rerun with the same settings resumes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # 2 shared cores: more threads make small convolutions much slower

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _method_bench import (  # noqa: E402
    CACHE_ROOT, CLASS_NAMES, RESULTS_DIR, CallCounter, FlipImages, Sweep, batched, cached_feature_teacher, data,
    log, make_args, make_timm, md_table, mean_std, paired, pct_cell, prepare, run_lines, setup_logging,
    train_eval,
)

from hf_distill import load_model  # noqa: E402

HINT_STUDENT, HINT_TEACHER = "resnet.encoder.stages.1", "layer2"


def student_config(s: dict):
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=1, embedding_size=s["student_widths"][0], hidden_sizes=list(s["student_widths"]),
                        depths=list(s["student_depths"]), layer_type="basic", num_labels=10,
                        id2label=dict(enumerate(CLASS_NAMES)), label2id={n: i for i, n in enumerate(CLASS_NAMES)})


def make_student(s: dict, seed: int):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(seed)
    return prepare(AutoModelForImageClassification.from_config(student_config(s)))


def teacher_stats(teacher, x, y) -> dict:
    """Accuracy and softness of a teacher's outputs on (unflipped) images."""
    logits = batched(teacher, x)[0]
    p1, p4 = logits.softmax(-1), (logits / 4).softmax(-1)
    ent = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())  # noqa: E731
    return {"accuracy": float((logits.argmax(1) == y).float().mean()), "mean_max_prob": float(p1.amax(-1).mean()),
            "entropy_T1": ent(p1), "entropy_T4": ent(p4)}


def run(sweep: Sweep, s: dict, work: Path) -> None:
    xtr, ytr, xte, yte = data(s["train_subset"], s["test_subset"])
    train_ds, test_ds = FlipImages(xtr, ytr, hflip=True), FlipImages(xte, yte)
    cfg_dir = work / "student_config"
    student_config(s).save_pretrained(cfg_dir)  # config only: SFTN builds its branches from it

    teachers, caches = {}, {}
    for kind, method, kw in (("standard", "supervised", {}),
                             ("sftn", "sftn", {"sftn_student_model": str(cfg_dir)})):
        folder = work / f"teacher_{kind}"
        key = f"teacher_{kind}"
        if not (sweep.get(key, s["teacher_seed"]) and (folder / "config.json").exists()):
            sweep.runs = [r for r in sweep.runs if r["config"] != key and not r["config"].endswith("_" + kind)]
            args = make_args(str(work / f"{key}_run"), method, s["teacher_epochs"], s["teacher_seed"], s["lr"], **kw)
            res = train_eval(make_timm(s["teacher"], s["teacher_seed"]), None, args, train_ds, test_ds,
                             keep_trainer=True)
            trainer = res.pop("_trainer")
            trainer.save_model(str(folder))  # the teacher only: SFTN branches are not saved
            res["saved_files"] = sorted(p.name for p in folder.iterdir())
            sweep.add(key, s["teacher_seed"], res)
            del trainer
        teacher = prepare(load_model(str(folder))).eval()  # how a saved SFTN teacher is used
        teachers[kind] = teacher
        info = sweep.extra.setdefault(key, {})
        if "test" not in info:
            info["test"] = teacher_stats(teacher, xte, yte)
            info["train"] = teacher_stats(teacher, xtr, ytr)
        c0 = time.process_time()
        feat_teacher = cached_feature_teacher(teacher, HINT_TEACHER, xtr)  # x then x flipped, checked vs live
        n = len(xtr)
        logits = (feat_teacher.logit_table[:n].clone(), feat_teacher.logit_table[n:].clone())
        info["cache_cpu_s"] = time.process_time() - c0
        info["cache_check_max_diff"] = feat_teacher.check_max_diff
        caches[kind] = (logits, feat_teacher)
        sweep.save()
        log.info("teacher %s (reloaded): test %.2f%%, train %.2f%%", kind, 100 * info["test"]["accuracy"],
                 100 * info["train"]["accuracy"])

    fit_kw = dict(hint_layers=[f"{HINT_STUDENT}:{HINT_TEACHER}"], hint_epochs=s["hint_epochs"])
    for seed in s["seeds"]:
        configs = [("alone", "supervised", None, train_ds, {})]
        for kind in ("standard", "sftn"):
            logits, feat_teacher = caches[kind]
            configs.append((f"kd_{kind}", "kd", teachers[kind], FlipImages(xtr, ytr, hflip=True, logits=logits), {}))
            configs.append((f"fitnets_{kind}", "fitnets", feat_teacher, train_ds, fit_kw))
        for config, method, teacher, ds, kw in configs:
            if sweep.get(config, seed):
                continue
            args = make_args(str(work / f"{config}_s{seed}"), method, s["student_epochs"], seed, s["lr"], **kw)
            counter = CallCounter(teacher) if method == "kd" else None
            res = train_eval(make_student(s, seed), teacher, args, ds, test_ds)
            if counter is not None:
                counter.remove()
                if counter.n:
                    raise RuntimeError(f"the teacher ran {counter.n} times although its logits were in every batch")
            sweep.add(config, seed, res)


def loss_at(run: dict, key: str, frac: float):
    logs = [h for h in run["loss_log"] if key in h]
    if not logs:
        return None
    return logs[max(0, min(len(logs) - 1, round(frac * len(logs)) - 1))][key]


def write_report(sweep: Sweep, s: dict, name: str) -> None:
    R = sweep.values
    alone = R("alone")
    q = " — QUICK" if s["quick"] else ""
    student_params = next((r["params"] for r in sweep.runs if r["config"] == "alone"), 0)
    lines = [f"# SFTN teacher vs standard teacher, judged by KD and FitNets students (Fashion-MNIST){q}", "",
             f"Data: stratified subset of {s['train_subset'] or 60000:,} Fashion-MNIST training images (subset seed 0, "
             f"the same for teachers and students), 28x28 grey, random horizontal flips; test: "
             f"{s['test_subset'] or 10000:,} test images, one evaluation at the end of each run. Every run: batch 128, "
             f"AdamW lr {s['lr']}, weight decay 0.05, cosine schedule to 0, 3% warm-up.", "",
             f"- **Teachers**: timm `{s['teacher']}` (`in_chans=1`, random init, seed {s['teacher_seed']}), "
             f"{s['teacher_epochs']} epochs each (same data, schedule and number of steps). *standard*: "
             "`distill_method=\"supervised\"`. *SFTN*: `distill_method=\"sftn\", sftn_student_model=<student config "
             "folder>` with defaults (student branches after layer1..layer3: 1x1 conv+BN+ReLU transform, then the "
             "student's remaining stages and head; lam_T = lam_KL = lam_CE = 1, T = 1). Both saved with "
             "`trainer.save_model` and loaded back with `hf_distill.load_model` before use.",
             f"- **Student**: transformers `ResNetForImageClassification` (basic blocks, embedding "
             f"{s['student_widths'][0]}, widths {'/'.join(map(str, s['student_widths']))}, depths "
             f"{'/'.join(map(str, s['student_depths']))}; {student_params:,} parameters), random init, "
             f"{s['student_epochs']} epochs for every configuration, seeds {', '.join(map(str, s['seeds']))} "
             "(seed = init, data order and flips; all runs reported).",
             "- **KD**: `distill_method=\"kd\"`, T 4, alpha 0.9 (defaults). The teacher's logits on every training "
             "image (plain and flipped) are computed once and read from the batch by the trainer (0 teacher calls, checked).",
             f"- **FitNets**: `distill_method=\"fitnets\"`, `hint_layers=[\"{HINT_STUDENT}:{HINT_TEACHER}\"]` "
             f"(student stage 2, 32ch 4x4, regressed by a 1x1 conv+BN onto the teacher's layer2, 128ch 4x4), "
             f"`hint_epochs={s['hint_epochs']}` (stage 1: hint loss only, layers up to the guided one), then KD "
             "(T 4, alpha 0.9, constant soft weight) for the remaining epochs. The teacher is replayed from its "
             "cached logits and cached layer2 output (max |cached − live| "
             + ", ".join(f"{k} {sweep.extra.get('teacher_' + k, {}).get('cache_check_max_diff', float('nan')):.1e}"
                         for k in ("standard", "sftn")) + ").", ""]

    # ---- teachers
    lines += ["## Teachers", ""]
    trows = []
    for kind in ("standard", "sftn"):
        r = sweep.get(f"teacher_{kind}", s["teacher_seed"])
        info = sweep.extra.get(f"teacher_{kind}", {})
        if not r:
            continue
        branches = ", ".join(f"{100 * v:.2f}" for k, v in sorted(r["metrics"].items()) if k.startswith("eval_branch"))
        trows.append([kind, f"{100 * r['accuracy']:.2f}",
                      f"{100 * info['test']['accuracy']:.2f}" if info.get("test") else "-",
                      f"{100 * info['train']['accuracy']:.2f}" if info.get("train") else "-",
                      f"{info['train']['mean_max_prob']:.3f} / {info['train']['entropy_T4']:.3f}" if info.get("train") else "-",
                      branches or "-", f"{r['train_cpu_s']:.0f} ({r['train_cpu_s'] / r['epochs']:.1f} / epoch)",
                      f"{r['trainable_extra_params']:,}"])
    lines += md_table(["teacher", "test acc % (trainer eval)", "test acc % (reloaded)", "train acc % (no flip)",
                       "train: mean max prob / entropy at T=4", "SFTN branch test acc % (1, 2, 3)",
                       "train CPU s", "training-only extra params"], trows)

    # ---- students
    lines += ["", "## Students: test accuracy (%)", ""]
    labels = [("alone", "student alone (supervised)"), ("kd_standard", "KD from standard teacher"),
              ("kd_sftn", "KD from SFTN teacher"), ("fitnets_standard", "FitNets from standard teacher"),
              ("fitnets_sftn", "FitNets from SFTN teacher")]
    rows = []
    for key, label in labels:
        v = R(key)
        if not v:
            continue
        m, per = pct_cell(v)
        d = paired(v, alone) if key != "alone" and alone else ("-", "-", "-")
        cpu = mean_std([r["train_cpu_s"] for r in sweep.runs if r["config"] == key])[0]
        rows.append([label, len(v), m, per, d[1], d[2], f"{cpu:.0f}"])
    lines += md_table(["configuration", "n", "mean ± std", "per seed (seed: %)", "Δ vs alone, paired (points)",
                       "seeds better than alone", "train CPU s / run"], rows)
    lines += ["", "**SFTN vs standard teacher** (paired per student seed; both teachers are single runs, seed 0):", ""]
    prow = []
    for a, b, la in (("kd_sftn", "kd_standard", "KD: SFTN − standard"),
                     ("fitnets_sftn", "fitnets_standard", "FitNets: SFTN − standard"),
                     ("fitnets_standard", "kd_standard", "standard teacher: FitNets − KD"),
                     ("fitnets_sftn", "kd_sftn", "SFTN teacher: FitNets − KD")):
        if R(a) and R(b):
            d = paired(R(a), R(b))
            prow.append([la, d[0], d[1], d[2]])
    lines += md_table(["comparison", "per seed (points)", "mean ± std", "seeds better"], prow)

    # ---- convergence
    lines += ["", "## Convergence check (training loss terms, mean over seeds, at 50% / 75% / 100% of training)", ""]
    crow = []
    for key, label in labels:
        rs = [r for r in sweep.runs if r["config"] == key]
        if not rs:
            continue
        cells = []
        for term in ("loss_ce", "loss_kd"):
            vals = [[loss_at(r, term, f) for r in rs] for f in (0.5, 0.75, 1.0)]
            if all(v is not None for vs in vals for v in vs):
                cells.append(f"{term}: " + " / ".join(f"{sum(vs) / len(vs):.3f}" for vs in vals))
        crow.append([label, "; ".join(cells)])
    lines += md_table(["configuration", "loss terms"], crow)
    lines += ["", "(Logged every 25 steps; the value at 100% is the last logging window. FitNets' values are "
              "from stage 2 only, where `loss_ce` / `loss_kd` exist.)"]
    lines += run_lines(sweep)
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines))
    log.info("wrote %s", RESULTS_DIR / f"{name}.md")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (1,000 / 1,000 images, 1 teacher epoch, 2 student epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--teacher-epochs", type=float, default=None)
    p.add_argument("--student-epochs", type=float, default=None)
    p.add_argument("--hint-epochs", type=float, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args(argv)
    setup_logging()
    q = a.quick
    s = {
        "quick": q, "teacher": "resnet18", "teacher_seed": 0, "lr": a.lr,
        "student_widths": [16, 32, 64, 128], "student_depths": [1, 1, 1, 1],
        "seeds": a.seeds or ([0, 1] if q else [0, 1, 2]),
        "teacher_epochs": a.teacher_epochs or (1 if q else 10),
        "student_epochs": a.student_epochs or (2 if q else 25),
        "hint_epochs": a.hint_epochs if a.hint_epochs is not None else (0.5 if q else 3),
        "train_subset": a.train_subset or (1000 if q else 10000),
        "test_subset": 1000 if q else None,
    }
    name = "bench_sftn_quick" if q else "bench_sftn"
    sweep = Sweep(name, s)
    sweep.meta["command"] = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    run(sweep, s, CACHE_ROOT / name)
    sweep.save()
    write_report(sweep, s, name)


if __name__ == "__main__":
    main()
