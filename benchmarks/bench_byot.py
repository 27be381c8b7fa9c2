"""Be Your Own Teacher (BYOT) on Fashion-MNIST: accuracy of every exit, and its training cost.

    python benchmarks/bench_byot.py            # full run, 12 epochs (~50 min of CPU at 1 thread)
    python benchmarks/bench_byot.py --quick    # smoke run (a few minutes); writes bench_byot_quick.*

Same network (timm ``resnet10t``, ``in_chans=1``, random init, 28x28), same data, same epochs and
optimiser for every configuration, seeds 0, 1, 2 (seed = init + data order + flips):

* ``supervised``: the network trained plainly (``distill_method="supervised"``);
* ``byot``: ``distill_method="byot"`` with its defaults (exits after ``layer1..layer3``, deepest
  classifier = the network's own head; alpha 0.3, feature weight 0.03, T 3). Reports the deepest
  classifier (the plain network, exits dropped), every exit and the ensemble (mean probability);
* ``kd``: teacher-then-student: a bigger teacher (timm ``resnet18``, trained plainly with the same
  epochs, seed 0, once) then the same ``resnet10t`` distilled from it with KD (T 4, alpha 0.9).
  The student reads the teacher's logits from the batch (computed once on every training image,
  plain and flipped: the trainer's cached-logit path, the teacher does not run; checked);

Timing (CPU seconds of this process, ``time.process_time``):

* per epoch, from the full runs: BYOT vs supervised (same seed, ratio per seed);
* per step, interleaved step by step on the same batches (median of repetitions): plain,
  BYOT, KD with the live teacher, KD from cached logits, for ``resnet10t`` and ``resnet18``;
* end to end: one BYOT run vs teacher training + logit caching + one KD student run.

Ablations (``SUPPLEMENTS``: e.g. the heavier ``conv`` exits) run as their own sweeps with
``--no-supervised --no-kd --skip-timing`` and are paired by seed with this one in its report.

Writes ``benchmarks/results/bench_byot.md`` and ``.json`` (every run's numbers; a rerun with the same
settings resumes and skips finished runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # 2 shared cores: more threads make small convolutions much slower

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _method_bench import (  # noqa: E402
    CACHE_ROOT, RESULTS_DIR, CallCounter, FlipImages, Sweep, data, flip_logits, log, make_args,
    make_timm, md_table, mean_std, paired, pct_cell, prepare, run_lines, setup_logging, train_eval,
)

from hf_distill import load_model  # noqa: E402
from hf_distill.data import collate_images  # noqa: E402


# ============================================================================ runs
PARTS = ("accuracy", "kd", "timing", "early_exit")
BYOT_KEYS = ("byot_alpha", "byot_feature_weight", "byot_exit_bottleneck", "byot_feature_reduction")


def byot_kwargs(s: dict) -> dict:
    """The BYOT arguments this sweep sets (the others keep the library defaults)."""
    return {k: s[k] for k in BYOT_KEYS if k in s}


def splits(s: dict):
    """(train x, train y, test x, test y, train dataset with flips, test dataset)."""
    xtr, ytr, xte, yte = data(s["train_subset"], s["test_subset"])
    return xtr, ytr, xte, yte, FlipImages(xtr, ytr, hflip=True), FlipImages(xte, yte)


def run_accuracy(sweep: Sweep, s: dict, seeds: list[int], work: Path) -> None:
    *_, train_ds, test_ds = splits(s)
    for seed in seeds:  # supervised and BYOT of one seed back to back (similar machine load)
        for config, method in (("supervised", "supervised"), ("byot", "byot")):
            if sweep.get(config, seed) or (config == "supervised" and s.get("no_supervised")):
                continue
            kw = byot_kwargs(s) if method == "byot" else {}
            args = make_args(str(work / f"{config}_s{seed}"), method, s["epochs"], seed, s["lr"], **kw)
            sweep.add(config, seed, train_eval(make_timm(s["student"], seed), None, args, train_ds, test_ds))


def run_kd(sweep: Sweep, s: dict, seeds: list[int], work: Path) -> None:
    """Teacher-then-student: the teacher (once), its logits on every training view, KD students."""
    xtr, ytr, xte, yte, train_ds, test_ds = splits(s)
    teacher_dir = work / "teacher"
    if not (sweep.get("teacher", s["teacher_seed"]) and (teacher_dir / "config.json").exists()):
        sweep.runs = [r for r in sweep.runs if r["config"] not in ("teacher", "kd")]
        args = make_args(str(work / "teacher_run"), "supervised", s["epochs"], s["teacher_seed"], s["lr"])
        res = train_eval(make_timm(s["teacher"], s["teacher_seed"]), None, args, train_ds, test_ds, keep_trainer=True)
        res.pop("_trainer").save_model(str(teacher_dir))
        sweep.add("teacher", s["teacher_seed"], res)
    teacher = prepare(load_model(str(teacher_dir))).eval()
    c0, w0 = time.process_time(), time.perf_counter()
    logits = flip_logits(teacher, xtr)
    cache_cpu, cache_wall = time.process_time() - c0, time.perf_counter() - w0
    acc_reloaded = float((flip_logits(teacher, xte)[0].argmax(1) == yte).float().mean())
    sweep.extra["teacher_cache"] = {"cpu_s": cache_cpu, "wall_s": cache_wall, "images": 2 * len(xtr),
                                    "reloaded_teacher_test_accuracy": acc_reloaded}
    kd_ds = FlipImages(xtr, ytr, hflip=True, logits=logits)
    for seed in seeds:
        if sweep.get("kd", seed):
            continue
        args = make_args(str(work / f"kd_s{seed}"), "kd", s["epochs"], seed, s["lr"])
        counter = CallCounter(teacher)
        res = train_eval(make_timm(s["student"], seed), teacher, args, kd_ds, test_ds)
        counter.remove()
        if counter.n:
            raise RuntimeError(f"the teacher ran {counter.n} times although its logits were in every batch")
        res["teacher_forward_calls_in_training"] = counter.n
        sweep.add("kd", seed, res)


# ============================================================================ step timing
def run_early_exit(sweep: Sweep, s: dict, seed: int, work: Path) -> None:
    """BYOT with its exits exported (same seed and recipe as the sweep's run), then an early-exit sweep
    on the test set: accuracy, exit shares, FLOPs per image (counted per piece) and measured time."""
    if "early_exit" in sweep.extra:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from byot_early_exit import piece_costs

    from hf_distill.models.exits import MultiExitModel

    _, _, xte, yte, train_ds, test_ds = splits(s)
    folder = work / f"byot_exits_s{seed}"
    args = make_args(str(folder), "byot", s["epochs"], seed, s["lr"], byot_export_exits=True, **byot_kwargs(s))
    res = train_eval(make_timm(s["student"], seed), None, args, train_ds, test_ds, keep_trainer=True)
    res.pop("_trainer").save_model(str(folder))
    model = MultiExitModel.from_pretrained(str(folder))
    cumulative, exit_costs, head_cost = piece_costs(model, xte[:1])
    leave = [cumulative[i] + sum(exit_costs[: i + 1]) for i in range(len(exit_costs))]
    leave.append(cumulative[-1] + sum(exit_costs) + head_cost)
    plain_cost = cumulative[-1] + head_cost

    def timed(fn):
        times, out = [], None
        for _ in range(3):
            c0 = time.process_time()
            out = fn()
            times.append(time.process_time() - c0)
        return out, 1e3 * statistics.median(times) / len(yte)

    rows = []
    with torch.no_grad():
        for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, None):
            if threshold is None:
                (logits, ms) = timed(lambda: model(xte))
                used = torch.full((len(yte),), len(exit_costs))
            else:
                (logits, used), ms = timed(lambda: model(xte, early_exit_threshold=threshold))
            n = len(yte)
            mflops = sum(leave[i] * int((used == i).sum()) for i in range(len(leave))) / n / 1e6
            rows.append({"threshold": "plain" if threshold is None else threshold,
                         "accuracy": float((logits.argmax(-1) == yte).float().mean()),
                         "mflops_per_image": plain_cost / 1e6 if threshold is None else mflops, "cpu_ms_per_image": ms,
                         "exit_share": [float((used == i).float().mean()) for i in range(len(leave))]})
        ens = float((model(xte, mode="ensemble").argmax(-1) == yte).float().mean())
    sweep.extra["early_exit"] = {"seed": seed, "rows": rows, "ensemble_accuracy": ens, "run": res, "test_images": len(yte),
                                 "plain_mflops": plain_cost / 1e6, "exit_mflops": [c / 1e6 for c in exit_costs]}
    sweep.save()
    log.info("early exit: %s", ", ".join(f"{r['threshold']}: {100 * r['accuracy']:.2f}% "
                                            f"{r['mflops_per_image']:.1f} MFLOPs" for r in rows))


def early_exit_lines(extra: dict) -> list[str]:
    rows = [[r["threshold"], f"{100 * r['accuracy']:.2f}", f"{r['mflops_per_image']:.2f}",
             f"{r['mflops_per_image'] / extra['plain_mflops']:.2f}x", f"{r['cpu_ms_per_image']:.3f}",
             " / ".join(f"{100 * x:.1f}" for x in r["exit_share"])] for r in extra["rows"]]
    return ["", f"### Early exit (BYOT seed {extra['seed']}, exported with its exits, reloaded with "
            f"`MultiExitModel.from_pretrained`; the {extra['test_images']:,} test images)", "",
            f"Re-trained with the same seed and recipe as the table's BYOT run: test accuracy "
            f"{100 * extra['run']['accuracy']:.2f}%. FLOPs counted per piece with `torch.utils.flop_counter` "
            "(a sample leaving at exit i pays the backbone up to stage i and every exit head it passed); "
            "CPU ms per image: median of 3 passes over the test set in one batch, 1 thread. Exit heads cost "
            + " / ".join(f"{c:.2f}" for c in extra["exit_mflops"]) + " MFLOPs per image; ensemble accuracy "
            f"{100 * extra['ensemble_accuracy']:.2f}%.", "",
            *md_table(["threshold", "accuracy %", "MFLOPs / image", "vs plain", "CPU ms / image",
                       "share leaving at exit 1 / 2 / 3 / deepest %"], rows)]


class Stepper:
    """One optimisation step of a DistillationTrainer (forward, loss, backward, optimizer step)."""

    def __init__(self, model, method, teacher=None, **kw):
        from hf_distill import DistillationTrainer

        args = make_args("/tmp/hfd_bench_byot_timing", method, 1, 0, 2e-3, **kw)
        self.trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args,
                                           train_dataset=FlipImages(torch.zeros(4, 1, 28, 28), torch.zeros(4).long()))
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        self.trainer.current_gradient_accumulation_steps = 1
        self.model = self.trainer.model_wrapped if self.trainer.model_wrapped is not None else self.trainer.model
        self.model.train()

    def step(self, batch):
        self.trainer.training_step(self.model, batch)
        self.trainer.optimizer.step()
        self.model.zero_grad()
        self.trainer._term_sums.clear()


def run_timing(sweep: Sweep, s: dict) -> None:
    if "step_timing" in sweep.extra:
        return
    xtr, ytr, _, _ = data(s["train_subset"], s["test_subset"])
    g = torch.Generator().manual_seed(0)
    n_batches = 8
    perm = torch.randperm(len(xtr), generator=g)[: 128 * n_batches]
    plain_batches = [collate_images([{"pixel_values": xtr[i], "labels": int(ytr[i])} for i in perm[b * 128:(b + 1) * 128]])
                     for b in range(n_batches)]
    out = {}
    for arch in s["timing_archs"]:
        teacher = make_timm(s["teacher"], 100).eval()  # weights do not matter for timing
        runners = {"plain": Stepper(make_timm(arch, 0), "supervised"), "byot": Stepper(make_timm(arch, 0), "byot")}
        batches = plain_batches
        if arch == s["student"]:
            runners["kd_live_teacher"] = Stepper(make_timm(arch, 0), "kd", teacher)
            runners["kd_cached_logits"] = Stepper(make_timm(arch, 0), "kd", teacher)
            with torch.no_grad():
                batches = [{**b, "teacher_logits": teacher(b["pixel_values"])} for b in plain_batches]
        # only the cached runner may read teacher_logits: others get the plain batch
        names = list(runners)
        for name in names:  # warm-up
            for b in batches[:s["timing_warmup"]]:
                runners[name].step(b if name == "kd_cached_logits" else {k: v for k, v in b.items() if k != "teacher_logits"})
        times = {n: [] for n in names}
        for rep in range(s["timing_reps"]):
            acc = dict.fromkeys(names, 0.0)
            for i in range(s["timing_steps"]):
                b = batches[(rep * s["timing_steps"] + i) % len(batches)]
                plain = {k: v for k, v in b.items() if k != "teacher_logits"}
                for name in (names if (rep + i) % 2 == 0 else names[::-1]):
                    c0 = time.process_time()
                    runners[name].step(b if name == "kd_cached_logits" else plain)
                    acc[name] += time.process_time() - c0
            for n in names:
                times[n].append(acc[n] / s["timing_steps"])
        res = {}
        for n in names:
            ratios = [a / b for a, b in zip(times[n], times["plain"])]
            res[n] = {"median_ms": 1e3 * statistics.median(times[n]), "per_rep_ms": [1e3 * t for t in times[n]],
                      "median_paired_ratio_to_plain": statistics.median(ratios), "paired_ratios": ratios}
        res["byot_extra_params"] = sum(p.numel() for p in runners["byot"].trainer.extra_modules.parameters())
        res["params"] = sum(p.numel() for p in runners["plain"].trainer.student.parameters())
        out[arch] = res
        log.info("step timing %s: %s", arch, ", ".join(f"{n} {res[n]['median_ms']:.0f} ms "
                                                        f"(x{res[n]['median_paired_ratio_to_plain']:.2f})" for n in names))
    sweep.extra["step_timing"] = out
    sweep.save()


# ============================================================================ report
BOTTLENECK_TEXT = {
    "sepconv": "per halving of the map a depthwise 3x3 stride-2 conv + pointwise 1x1 conv + BN (`sepconv`, the default)",
    "conv": "per halving of the map a full 3x3 stride-2 conv + BN + ReLU, then a 1x1 conv + BN (`conv`)",
}


def write_report(sweep: Sweep, s: dict, name: str) -> None:
    R = lambda c, **k: sweep.values(c, **k)  # noqa: E731
    sup, byot, kd = R("supervised"), R("byot"), R("kd")
    t_run = sweep.get("teacher", s["teacher_seed"])
    lines = [f"# Be Your Own Teacher vs plain training vs teacher-then-student KD (Fashion-MNIST){' — QUICK' if s['quick'] else ''}",
             ""]
    lines += [
        f"Network: timm `{s['student']}` (`in_chans=1`, random init, "
        f"{sweep.runs[0]['params']:,} parameters). Data: stratified subset of {s['train_subset'] or 60000:,} "
        f"Fashion-MNIST training images (subset seed 0, the same for every run), 28x28 grey, random horizontal flips; "
        f"test: {s['test_subset'] or 10000:,} test images. Every run: {s['epochs']} epochs, batch 128, AdamW lr "
        f"{s['lr']}, weight decay 0.05, cosine schedule, 3% warm-up, one evaluation at the end. Seeds: "
        f"{', '.join(map(str, sorted({r['seed'] for r in sweep.runs if r['config'] != 'teacher'})))} "
        "(all runs reported).", "",
        "- **supervised**: `distill_method=\"supervised\"`.",
        "- **BYOT**: `distill_method=\"byot\"`, exits after `layer1`, `layer2`, `layer3` (bottleneck = "
        + BOTTLENECK_TEXT[s.get("byot_exit_bottleneck", "sepconv")] + ", then pooling + linear); deepest "
        f"classifier = the network's head; alpha {s.get('byot_alpha', 0.3)}, feature weight "
        f"{s.get('byot_feature_weight', 0.03)} ({s.get('byot_feature_reduction', 'sum')} over a sample's features), T 3 "
        f"({'non-default values set on the command line' if byot_kwargs(s) else 'defaults'}). "
        f"Exits add {sweep.runs[[r['config'] for r in sweep.runs].index('byot')]['trainable_extra_params']:,} "
        "training-only parameters. *Deepest* = the plain network with the exits dropped (same inference cost "
        "as supervised).",
        (f"- **KD**: teacher timm `{s['teacher']}` ({t_run['params']:,} parameters) trained plainly with the "
        f"same recipe (seed {s['teacher_seed']}, once), then `{s['student']}` distilled from it "
        "(`distill_method=\"kd\"`, T 4, alpha 0.9, defaults). The teacher's logits on every training image "
        "(plain and flipped) are computed once and read from the batch by the trainer, so the teacher does "
        "not run during student training (checked: 0 teacher forward calls).") if t_run else
        "- (no teacher-then-student KD in this run)", "",
        "## Test accuracy (%)", ""]
    rows = []
    base = sup

    def row(label, vals, delta=True, cpu=None):
        if not vals:
            return
        m, per = pct_cell(vals)
        d = paired(vals, base) if delta and base else ("-", "-", "-")
        rows.append([label, len(vals), m, per, d[1], d[2], f"{cpu:.0f}" if cpu is not None else "-"])

    cpu = lambda c: mean_std([r["train_cpu_s"] for r in sweep.runs if r["config"] == c])[0]  # noqa: E731
    row(f"supervised {s['student']}", sup, delta=False, cpu=cpu("supervised"))
    row("BYOT — deepest classifier (plain network)", byot, cpu=cpu("byot"))
    for i in (1, 2, 3):
        row(f"BYOT — exit {i} (after layer{i})", R("byot", metric=f"eval_exit{i}_accuracy"))
    row("BYOT — ensemble of all 4 classifiers", R("byot", metric="eval_ensemble_accuracy"))
    if t_run:
        m = f"{100 * t_run['accuracy']:.2f}"
        rows.append([f"teacher {s['teacher']} (seed {s['teacher_seed']})", 1, m, f"{s['teacher_seed']}: {m}",
                     "-", "-", f"{t_run['train_cpu_s']:.0f}"])
    row(f"KD {s['student']} from the teacher", kd, cpu=cpu("kd"))
    lines += md_table(["configuration", "n", "mean ± std", "per seed (seed: %)",
                       "Δ vs supervised, paired per seed (points)", "seeds better", "train CPU s / run"], rows)
    lines += ["", "Paired differences (same seed = same init, data order and flips):", ""]
    prow = []
    for a, b, la, lb in (("byot", "supervised", "BYOT deepest", "supervised"), ("kd", "supervised", "KD", "supervised"),
                         ("byot", "kd", "BYOT deepest", "KD")):
        if R(a) and R(b):
            d = paired(R(a), R(b))
            prow.append([f"{la} − {lb}", d[0], d[1], d[2]])
    ens = R("byot", metric="eval_ensemble_accuracy")
    if ens and byot:
        d = paired(ens, byot)
        prow.append(["BYOT ensemble − BYOT deepest", d[0], d[1], d[2]])
    lines += md_table(["comparison", "per seed (points)", "mean ± std", "seeds better"], prow)

    # ---- timing
    lines += ["", "## Training cost", "", "### Per epoch, from the runs above (CPU seconds of the benchmark process)", ""]
    trows = []
    for c in ("supervised", "byot", "kd"):
        rs = sorted([r for r in sweep.runs if r["config"] == c], key=lambda r: r["seed"])
        if rs:
            per = [r["train_cpu_s"] / r["epochs"] for r in rs]
            m, sd = mean_std(per)
            trows.append([c, ", ".join(f"{r['seed']}: {p:.1f}" for r, p in zip(rs, per)), f"{m:.1f} ± {sd:.1f}",
                          f"{mean_std([r['train_wall_s'] / r['epochs'] for r in rs])[0]:.0f}"])
    if t_run:
        trows.append([f"teacher {s['teacher']}", f"{s['teacher_seed']}: {t_run['train_cpu_s'] / t_run['epochs']:.1f}",
                      f"{t_run['train_cpu_s'] / t_run['epochs']:.1f}", f"{t_run['train_wall_s'] / t_run['epochs']:.0f}"])
    lines += md_table(["run", "CPU s / epoch per seed", "mean ± std", "wall s / epoch (mean)"], trows)
    sup_runs = {r["seed"]: r for r in sweep.runs if r["config"] == "supervised"}
    by_runs = {r["seed"]: r for r in sweep.runs if r["config"] == "byot"}
    seeds = sorted(set(sup_runs) & set(by_runs))
    if seeds:
        ratios = [by_runs[k]["train_cpu_s"] / sup_runs[k]["train_cpu_s"] for k in seeds]
        m, sd = mean_std(ratios)
        lines += ["", f"**BYOT / supervised CPU time per epoch: {m:.2f}x** (per seed: "
                  f"{', '.join(f'{k}: {r:.2f}' for k, r in zip(seeds, ratios))}; target ≤ 1.3x). "
                  "Both include the Trainer's data loading, logging and optimizer; the runs of one seed ran back to back."]
    st = sweep.extra.get("step_timing")
    if st:
        lines += ["", "### Per training step, interleaved (batch 128, CPU ms per step, median of "
                  f"{s['timing_reps']} repetitions x {s['timing_steps']} steps; runners alternate step by step on the "
                  "same batches after "
                  f"{s['timing_warmup']} warm-up steps)", ""]
        srows = []
        for arch, res in st.items():
            for n in ("plain", "byot", "kd_live_teacher", "kd_cached_logits"):
                if n in res:
                    srows.append([arch, n, f"{res[n]['median_ms']:.0f}", f"{res[n]['median_paired_ratio_to_plain']:.2f}x",
                                  ", ".join(f"{x:.2f}" for x in res[n]["paired_ratios"])])
        lines += md_table(["network", "step", "CPU ms / step", "ratio to plain (median of paired)",
                           "paired ratios per repetition"], srows)
        lines += ["", "`kd_live_teacher` runs a `resnet18` teacher forward (eval, no_grad) every step; "
                  "`kd_cached_logits` reads the teacher's logits from the batch. "
                  + "; ".join(f"{a}: exits add {r['byot_extra_params']:,} parameters to {r['params']:,}"
                              for a, r in st.items()) + "."]

    # ---- end to end
    cache = sweep.extra.get("teacher_cache")
    if t_run and byot and kd and cache:
        b_cpu = cpu("byot")
        kd_cpu = cpu("kd")
        pipe = t_run["train_cpu_s"] + cache["cpu_s"] + kd_cpu
        lines += ["", "### End to end (CPU seconds, training only; final evaluations excluded)", ""]
        erows = [["BYOT (one run)", f"{b_cpu:.0f}", "-", f"{b_cpu:.0f}", "1.00x"],
                 ["teacher-then-student KD, cached logits (as run)",
                  f"teacher {t_run['train_cpu_s']:.0f} + logit cache {cache['cpu_s']:.0f}",
                  f"{kd_cpu:.0f}", f"{pipe:.0f}", f"{pipe / b_cpu:.2f}x"]]
        if st and s["student"] in st and "kd_live_teacher" in st[s["student"]]:
            r = st[s["student"]]
            live_student = kd_cpu * r["kd_live_teacher"]["median_ms"] / r["kd_cached_logits"]["median_ms"]
            pipe_live = t_run["train_cpu_s"] + live_student
            erows.append(["teacher-then-student KD, live teacher (estimate)", f"teacher {t_run['train_cpu_s']:.0f}",
                          f"≈{live_student:.0f}", f"≈{pipe_live:.0f}", f"≈{pipe_live / b_cpu:.2f}x"])
        lines += md_table(["pipeline", "teacher stage", "student stage", "total", "vs BYOT"], erows)
        lines += ["", "The estimate scales the measured cached-logit student time by the interleaved step-time ratio "
                  "live/cached. Several students from one teacher share the teacher's cost; BYOT has none to share. "
                  f"Reloaded teacher's test accuracy from its saved folder: {100 * cache['reloaded_teacher_test_accuracy']:.2f}%."]

    if "early_exit" in sweep.extra:
        lines += early_exit_lines(sweep.extra["early_exit"])
    lines += supplement_lines(name, sweep)
    lines += run_lines(sweep)
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines))
    log.info("wrote %s", RESULTS_DIR / f"{name}.md")


SUPPLEMENTS = {  # name -> (what it changes, command); its runs are paired by seed with the main table's
    "bench_byot_conv_exits": ("exits with full 3x3 convolutions (`--byot-exit-bottleneck conv`), same epochs",
                              "python benchmarks/bench_byot.py --name bench_byot_conv_exits "
                              "--byot-exit-bottleneck conv --no-supervised --parts accuracy"),
    "bench_byot_20ep": ("a longer budget: 20 epochs for supervised and BYOT",
                        "python benchmarks/bench_byot.py --name bench_byot_20ep --epochs 20 --parts accuracy"),
}


def supplement_lines(name: str, main: Sweep) -> list[str]:
    """Follow-up sweeps (own JSON files) paired per seed with the main table's runs.

    A sweep with its own supervised runs (another budget) is compared with those; one without
    (an ablation of BYOT alone) with the main table's supervised runs.
    """
    import json

    if name != "bench_byot":
        return []
    lines = []
    main_byot = main.values("byot")
    for sup_name, (what, cmd) in SUPPLEMENTS.items():
        path = RESULTS_DIR / f"{sup_name}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        runs = {r["seed"]: r for r in d["runs"] if r["config"] == "byot"}
        if not runs:
            continue
        own_sup = {r["seed"]: r["accuracy"] for r in d["runs"] if r["config"] == "supervised"}
        sup = own_sup or main.values("supervised")
        own_cpu = {r["seed"]: r["train_cpu_s"] for r in d["runs"] if r["config"] == "supervised"}
        if not own_cpu and d["settings"]["epochs"] == main.settings["epochs"]:  # same budget: the main runs
            own_cpu = {r["seed"]: r["train_cpu_s"] for r in main.runs if r["config"] == "supervised"}
        n_params = next(iter(runs.values()))["trainable_extra_params"]
        main_params = next(r for r in main.runs if r["config"] == "byot")["trainable_extra_params"]
        rows = []
        for seed, r in sorted(runs.items()):
            m = r["metrics"]
            rows.append([seed, f"{100 * sup[seed]:.2f}" if seed in sup else "-", f"{100 * r['accuracy']:.2f}",
                         f"{100 * (r['accuracy'] - sup[seed]):+.2f}" if seed in sup else "-",
                         f"{100 * (r['accuracy'] - main_byot[seed]):+.2f}" if seed in main_byot else "-",
                         " / ".join(f"{100 * m[f'eval_exit{i}_accuracy']:.2f}" for i in (1, 2, 3)),
                         f"{100 * m['eval_ensemble_accuracy']:.2f}",
                         f"{r['train_cpu_s'] / own_cpu[seed]:.2f}x" if seed in own_cpu else "-"])
        acc = {k: v["accuracy"] for k, v in runs.items()}
        ens = {k: v["metrics"]["eval_ensemble_accuracy"] for k, v in runs.items()}
        lines += ["", f"## Follow-up: {what}", "",
                  f"Same data, recipe and seeds as the main table unless stated (`{cmd}`); {d['settings']['epochs']:g} "
                  f"epochs; exits add {n_params:,} parameters (main table: {main_params:,}). Supervised = "
                  f"{'this sweep' if own_sup else 'the main table'}'s runs.", "",
                  *md_table(["seed", "supervised %", "BYOT deepest %", "Δ vs supervised (points)",
                             "Δ vs main-table BYOT (points)", "BYOT exits 1 / 2 / 3 %", "BYOT ensemble %",
                             "BYOT / supervised CPU"], rows), "",
                  f"BYOT deepest {pct_cell(acc)[0]}, ensemble {pct_cell(ens)[0]}"
                  + (f", supervised {pct_cell({k: v for k, v in sup.items() if k in acc})[0]}" if sup else "")
                  + f"; BYOT deepest − supervised {paired(acc, sup)[1]} ({paired(acc, sup)[2]} seeds better); "
                  f"ensemble − supervised {paired(ens, sup)[1]} ({paired(ens, sup)[2]})."]
        if "early_exit" in d.get("extra", {}):
            lines += early_exit_lines(d["extra"]["early_exit"])
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (1,000 train / 1,000 test images, 1 epoch, 2 seeds)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="what to run (default all). Runs of one sweep can be split over processes, e.g. "
                   "`--parts accuracy timing --seeds 0 1` beside `--parts accuracy kd --seeds 2`: they share "
                   "results/<name>.json (merged under a lock); --seeds picks the seeds of accuracy and kd")
    p.add_argument("--report-only", action="store_true", help="rewrite results/<name>.md from the JSON files")
    p.add_argument("--skip-timing", action="store_true", help="no interleaved step timing (= leave out the timing part)")
    p.add_argument("--no-kd", action="store_true", help="no teacher-then-student KD runs (= leave out the kd part)")
    p.add_argument("--byot-alpha", type=float, default=None, help="BYOT alpha (library default 0.3)")
    p.add_argument("--byot-feature-weight", type=float, default=None, help="BYOT feature weight (library default 0.03)")
    p.add_argument("--byot-exit-bottleneck", default=None, choices=["sepconv", "conv"],
                   help="BYOT exit bottleneck (library default sepconv)")
    p.add_argument("--byot-feature-reduction", default=None, choices=["sum", "mean"],
                   help="BYOT feature term reduction (library default sum)")
    p.add_argument("--no-supervised", action="store_true", help="no supervised runs (ablations pair with the main sweep)")
    p.add_argument("--name", default=None, help="results name (default bench_byot, or bench_byot_quick with --quick)")
    a = p.parse_args(argv)
    setup_logging()
    q = a.quick
    s = {
        "quick": q, "student": a.student, "teacher": a.teacher, "teacher_seed": 0, "lr": a.lr,
        "epochs": a.epochs or (1 if q else 12),
        "train_subset": a.train_subset or (1000 if q else 10000),
        "test_subset": 1000 if q else None,
        "timing_archs": [a.student] if q else [a.student, a.teacher],
        "timing_warmup": 1 if q else 3, "timing_reps": 2 if q else 5, "timing_steps": 2 if q else 6,
    }
    for key in ("no_supervised", *BYOT_KEYS):  # recorded only when set (keeps old settings valid)
        value = getattr(a, key)
        if value is not None and value is not False:  # (0.0 is a value: `in (None, False)` would drop it)
            s[key] = getattr(a, key)
    name = a.name or ("bench_byot_quick" if q else "bench_byot")
    sweep = Sweep(name, s)
    sweep.meta["command"] = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    work = CACHE_ROOT / name
    if a.report_only:
        write_report(sweep, s, name)
        return
    seeds = a.seeds or ([0, 1] if q else [0, 1, 2])
    parts = [x for x in a.parts if not (x == "timing" and a.skip_timing) and not (x == "kd" and a.no_kd)]
    if "accuracy" in parts:
        run_accuracy(sweep, s, seeds, work)
    if "kd" in parts:
        run_kd(sweep, s, seeds, work)
    if "timing" in parts:
        run_timing(sweep, s)
    if "early_exit" in parts:
        run_early_exit(sweep, s, seeds[0], work)
    sweep.save()
    write_report(sweep, s, name)


if __name__ == "__main__":
    main()
