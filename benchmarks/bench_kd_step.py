"""Time per training step: ``DistillationTrainer`` (``distill_method="kd"``) vs a minimal hand-written
PyTorch KD loop, on the same models, the same in-memory batches, the same optimizer and threads.

    python benchmarks/bench_kd_step.py            # full run (a few minutes), writes results/bench_kd_step.md
    python benchmarks/bench_kd_step.py --quick    # short smoke run

Two comparisons, each interleaved step by step (trainer step, hand step, hand step, trainer step, ...)
so both see the same machine load, over several repetitions:

* **step**: ``trainer.training_step(model, inputs)`` + ``optimizer.step()`` + ``model.zero_grad()``
  (the per-step work of the Trainer's inner loop that hf_distill overrides or calls into) vs one
  hand step. Target: trainer / hand <= 1.05.
* **train() loop**: ``trainer.train()`` with ``max_steps=N`` on a dataset whose items are the same
  pre-collated batches (batch size 1 + a collator returning the item, so no collation is timed) vs
  the hand loop's steps on the same batches, run one by one from a callback at each
  ``on_step_end``. A trainer step is timed from the end of the previous hand step to its own
  ``on_step_end``, so it holds everything ``train()`` does per step: batch fetch, callbacks,
  ``training_step``, gradient clipping to ``max_grad_norm=1.0`` with the grad norm, optimizer,
  linear lr schedule, ``zero_grad``, logging every 10 steps. The first ``--loop-warmup`` steps are
  left out; ``train()``'s one-off set-up and teardown are reported separately. A third runner, the
  hand loop plus ``clip_grad_norm_(params, 1.0)``, separates the clipping maths the Trainer does by
  default from its machinery.

Two clocks per step: wall (``perf_counter``) and CPU (``process_time``; robust to other jobs on
the machine). Default one torch thread (``--threads``) and a steady glibc allocator (``--malloc``,
see ``_bench_common.tune_malloc``) so that noise from a shared machine and from the allocator does
not land on one runner.

The hand loop: teacher in eval under ``torch.no_grad``, loss ``(1-a)*CE + a*T^2*KL`` (batchmean),
the optimizer class and kwargs the Trainer builds from the same arguments (AdamW, same lr). The
first two losses (before and after one optimizer step) are checked to agree to 1e-5.

Peak memory: peak RSS (``VmHWM``; see ``_bench_common.peak_rss_mb`` for why not ``ru_maxrss``) of
a fresh interpreter per configuration (torch's CPU allocations are invisible to tracemalloc), with
the RSS just before the steps (glibc allocator defaults there).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as C  # noqa: E402
import torch  # noqa: E402

NAME = "bench_kd_step"
TIMING_HEAD = ["image", "clock", "trainer ms/step (median)", "hand ms/step (median)", "ratio of medians",
               "ratio (paired median)", "min ms trainer / hand", "per-repetition ratios"]
LR, TEMPERATURE, ALPHA = 1e-3, 4.0, 0.9


def parse(argv=None):
    p = C.step_bench_parser(__doc__.split("\n\n")[0], NAME)
    p.add_argument("--loop-sizes", type=int, nargs="+", default=None,
                   help="image sizes for the train() loop comparison (default: the first of --sizes)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per runner before the step comparison")
    p.add_argument("--loop-warmup", type=int, default=3, help="train() loop: steps left out of the steady state")
    p.add_argument("--child", choices=["hand", "trainer_step", "trainer_train"], help=argparse.SUPPRESS)
    a = C.step_bench_defaults(p.parse_args(argv), NAME)
    a.loop_sizes = a.loop_sizes or a.sizes[:1]
    return a


# ------------------------------------------------------------------------------------- helpers
def build(args, size):
    teacher, student = C.make_models(args.teacher, args.student, size)
    return teacher, student


def make_hand(student, teacher, out_dir, clip=None):
    opt_cls, opt_kwargs = C.trainer_optimizer_kwargs()
    return C.HandKD(C.fresh(student), C.fresh(teacher), LR, TEMPERATURE, ALPHA, opt_cls, opt_kwargs, clip=clip)


def make_trainer_step(student, teacher, batches, out_dir):
    trainer = C.make_trainer(C.fresh(student), C.fresh(teacher), batches, out_dir, LR, TEMPERATURE, ALPHA)
    return C.TrainerStep(trainer)


def train_loop_trainer(student, teacher, batches, out_dir, n):
    return C.make_trainer(C.fresh(student), C.fresh(teacher), batches[:n], out_dir, LR, TEMPERATURE, ALPHA,
                          max_steps=n, logging_steps=10)


# ------------------------------------------------------------------------------------- parts
def check_losses(args, size, out_dir):
    teacher, student = build(args, size)
    batches = C.make_batches(2, args.batch_size, size, seed=123)
    tr, hand = make_trainer_step(student, teacher, batches, out_dir), make_hand(student, teacher, out_dir)
    got = [(float(tr.step(b)), float(hand.step(b))) for b in batches]
    return [abs(a - b) for a, b in got], got


def compare_step(args, size, out_dir):
    teacher, student = build(args, size)
    batches = C.make_batches(8, args.batch_size, size, seed=1)
    runners = {"trainer": make_trainer_step(student, teacher, batches, out_dir), "hand": make_hand(student, teacher, out_dir)}
    for r in runners.values():
        C.time_steps(r, batches, args.warmup)
    # what Trainer.log does at each logging step: keeps the per-step loss terms list short
    times = C.alternating(runners, batches, args.reps, args.steps, after_rep=runners["trainer"].flush_logs)
    return {clock: C.summarize(t, "hand") for clock, t in times.items()}


class AlternateHand:
    """A callback that runs one step of each hand loop at every trainer ``on_step_end`` and times
    them all: trainer step k = from the end of the hand steps after step k-1 to ``on_step_end`` of
    step k (everything ``train()`` does per step: batch fetch, callbacks, training_step, clipping,
    optimizer, scheduler, zero_grad, logging), hand steps k = run right after it on a batch of the
    same list (their order flipped every step). Trainer and hand steps thus alternate one by one."""

    def __init__(self, hands: dict, batches):
        from transformers import TrainerCallback

        names = list(hands)
        self.times = {c: {n: [] for n in ["trainer", *names]} for c in C.CLOCKS}
        outer = self
        clocks = C.CLOCKS

        def now():
            return {c: f() for c, f in clocks.items()}

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.last = now()

            def on_step_end(self, args, state, control, **kw):
                t0 = now()
                for c in clocks:
                    outer.times[c]["trainer"].append(t0[c] - outer.last[c])
                batch = batches[(state.global_step - 1) % len(batches)]
                for name in (names if state.global_step % 2 else names[::-1]):
                    h0 = now()
                    hands[name].step(batch)
                    h1 = now()
                    for c in clocks:
                        outer.times[c][name].append(h1[c] - h0[c])
                outer.last = now()

        self.callback = _CB()


def compare_train_loop(args, size, out_dir):
    teacher, student = build(args, size)
    n = args.steps + args.loop_warmup
    batches = C.make_batches(n, args.batch_size, size, seed=2)
    names = ["trainer", "hand", "hand + clip"]
    times = {c: {k: [] for k in names} for c in C.CLOCKS}
    fixed = []

    def rep(record=True):
        trainer = train_loop_trainer(student, teacher, batches, out_dir, n)
        hands = {"hand": make_hand(student, teacher, out_dir),
                 "hand + clip": make_hand(student, teacher, out_dir, clip=trainer.args.max_grad_norm)}
        alt = AlternateHand(hands, batches)
        trainer.add_callback(alt.callback)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        assert len(alt.times["wall"]["trainer"]) == n, len(alt.times["wall"]["trainer"])
        if record:
            w = args.loop_warmup
            for c in C.CLOCKS:
                for k in names:
                    times[c][k].append(sum(alt.times[c][k][w:]) / (n - w))
            fixed.append(wall - sum(sum(v) for v in alt.times["wall"].values()))

    rep(record=False)  # untimed: thread pools, allocator, lazy imports
    for _ in range(args.reps):
        rep()
    res = {c: C.summarize(t, "hand") for c, t in times.items()}
    res["fixed_s"] = sorted(fixed)[len(fixed) // 2]
    return res


def timing_rows(size, res, extra=()):
    rows = []
    for clock in C.CLOCKS:
        s = res[clock]
        rows.append((f"{size}x{size}", clock, f"{s['trainer']['median_ms']:.1f}", f"{s['hand']['median_ms']:.1f}",
                     f"{s['trainer']['ratio_of_medians']:.3f}", f"**{s['trainer']['median_paired_ratio']:.3f}**",
                     f"{s['trainer']['min_ms']:.1f} / {s['hand']['min_ms']:.1f}",
                     " ".join(f"{r:.3f}" for r in s["trainer"]["paired_ratios"]), *extra))
    return rows


def clip_rows(size, res):
    """train() loop: the hand loop that also clips to max_grad_norm, as the Trainer does by default."""
    rows = []
    for clock in C.CLOCKS:
        t, h, hc = (res[clock][k] for k in ("trainer", "hand", "hand + clip"))
        paired = [a / b for a, b in zip(t["paired_ratios"], hc["paired_ratios"])]  # (t/h)/(hc/h) = t/hc
        rows.append((f"{size}x{size}", clock, f"{t['median_ms']:.1f}", f"{hc['median_ms']:.1f}", f"{h['median_ms']:.1f}",
                     f"{hc['median_paired_ratio']:.3f}", f"**{sorted(paired)[len(paired) // 2]:.3f}**",
                     " ".join(f"{r:.3f}" for r in paired)))
    return rows


def profile_trainer(args, size, out_dir, steps):
    """cProfile of ``trainer.train()`` over ``steps`` steps; ms/step of the trainer-side functions."""
    teacher, student = build(args, size)
    batches = C.make_batches(steps, args.batch_size, size, seed=3)
    trainer = train_loop_trainer(student, teacher, batches, out_dir, steps)
    trainer.train()  # warm
    trainer = train_loop_trainer(student, teacher, batches, out_dir, steps)
    prof = cProfile.Profile()
    prof.enable()
    trainer.train()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    wanted = ("hf_distill/", "transformers/trainer", "accelerate/", "torch/nn/utils/clip_grad", "torch/optim/",
              "torch/utils/data/")
    # Pure bookkeeping frames (no model, optimizer or clipping maths underneath): their own time is
    # the Python overhead the Trainer and hf_distill add per step.
    framework = ("hf_distill/trainer.py", "hf_distill/methods/", "hf_distill/teacher.py", "hf_distill/models/calling.py",
                 "hf_distill/models/specs.py", "hf_distill/models/loading.py", "hf_distill/models/saving.py",
                 "transformers/trainer", "accelerate/")
    own_framework = 0.0
    for (file, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        if any(w in file for w in framework):
            own_framework += tt
        if any(w in file for w in wanted):
            short = file.split("site-packages/")[-1].split("/work/main/")[-1]
            rows.append((ct / steps * 1e3, tt / steps * 1e3, nc / steps, f"`{short}:{line} {func}`"))
    rows.sort(reverse=True)
    total = sum(v[2] for v in stats.stats.values())  # own times add up to the profiled total
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    summary = (own_framework / steps * 1e3, total / steps * 1e3)
    return rows, summary, buf.getvalue()


# ------------------------------------------------------------------------------------- memory child
def child(args):
    size, n = args.child_size, args.steps + args.loop_warmup
    out_dir = C.tmpdir("hfd_bench_mem_")
    teacher, student = build(args, size)
    batches = C.make_batches(n, args.batch_size, size, seed=4)
    if args.child == "hand":
        r = make_hand(student, teacher, out_dir)
        del teacher, student
        before = C.rss_now_mb()
        for b in batches:
            r.step(b)
    elif args.child == "trainer_step":
        r = make_trainer_step(student, teacher, batches, out_dir)
        del teacher, student
        before = C.rss_now_mb()
        for b in batches:
            r.step(b)
    else:
        trainer = train_loop_trainer(student, teacher, batches, out_dir, n)
        del teacher, student
        before = C.rss_now_mb()
        trainer.train()
    print(C.json.dumps({"rss_before_mb": before, "peak_mb": C.peak_rss_mb()}))


# ------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse(argv)
    malloc = C.prepare_process(args)
    if args.child:
        return child(args)
    out_dir = C.tmpdir("hfd_bench_kd_")
    t_start = time.perf_counter()
    info = C.machine_rows(args.threads, malloc)
    cfg = (f"teacher `{args.teacher}` -> student `{args.student}` (timm, pretrained=False, 10 classes), "
           f"batch {args.batch_size}, RGB, lr {LR}, T={TEMPERATURE}, alpha={ALPHA}, fp32, CPU")
    opt_cls, opt_kwargs = C.trainer_optimizer_kwargs()
    md = [f"# {NAME}: DistillationTrainer (kd) vs a hand-written KD loop", "",
          f"Command: `python benchmarks/{NAME}.py{''.join(' ' + a for a in sys.argv[1:])}`", "",
          C.md_table(["machine", "value"], info), "",
          f"Models: {cfg}. Optimizer (both): `{opt_cls.__module__}.{opt_cls.__name__}` "
          f"`{ {k: v for k, v in opt_kwargs.items()} }`. Timing: {args.reps} repetitions x "
          f"{args.steps} steps per runner, trainer and hand steps alternating one by one (order flipped every "
          f"step), after {args.warmup} warm-up steps (step) / one untimed train() and {args.loop_warmup} in-loop "
          "steps (train() loop). Ratio = trainer / hand; 'paired' = median over repetitions of the "
          "per-repetition ratio (each repetition: mean ms/step over its steps). Clocks: 'wall' = "
          "`time.perf_counter`; 'cpu' = `time.process_time` (CPU time of this process, all threads), far less "
          "sensitive to other jobs sharing the cores, so the 'cpu' ratio is the one to trust on a busy machine.", ""]

    check_rows, step_rows, loop_rows, clip_table, mem_rows, ratios = [], [], [], [], [], {}
    for size in args.sizes:
        diffs, got = check_losses(args, size, out_dir)
        ok = all(d <= 1e-5 for d in diffs)
        check_rows.append((f"{size}x{size}", f"{got[0][0]:.6f}", f"{got[0][1]:.6f}", f"{diffs[0]:.1e}",
                           f"{got[1][0]:.6f}", f"{got[1][1]:.6f}", f"{diffs[1]:.1e}", "yes" if ok else "**NO**"))
        print(f"[{size}] loss check: {got} diffs {diffs}", flush=True)
        if not ok:
            print("WARNING: losses differ by more than 1e-5", flush=True)

        s = compare_step(args, size, out_dir)
        print(f"[{size}] step: {s}", flush=True)
        for clock in C.CLOCKS:
            ratios[(size, "step", clock)] = s[clock]["trainer"]["median_paired_ratio"]
        step_rows += timing_rows(size, s)

        t = compare_train_loop(args, size, out_dir) if size in args.loop_sizes else None
        print(f"[{size}] train loop: {t}", flush=True)
        if t is not None:
            for clock in C.CLOCKS:
                ratios[(size, "train() loop", clock)] = t[clock]["trainer"]["median_paired_ratio"]
            loop_rows += timing_rows(size, t, extra=(f"{t['fixed_s']:.2f}",))
            clip_table += clip_rows(size, t)
            for clock in C.CLOCKS:
                pr = [a / b for a, b in zip(t[clock]["trainer"]["paired_ratios"], t[clock]["hand + clip"]["paired_ratios"])]
                ratios[(size, "train() loop vs hand + clip", clock)] = sorted(pr)[len(pr) // 2]

        if not args.no_memory:
            mem = {}
            for which in ("hand", "trainer_step", "trainer_train"):
                child_args = ["--child", which, "--child-size", str(size), "--threads", str(args.threads),
                              "--teacher", args.teacher, "--student", args.student, "--batch-size",
                              str(args.batch_size), "--steps", str(min(args.steps, 7)), "--loop-warmup", str(args.loop_warmup)]
                mem[which] = C.child_memory(os.path.abspath(__file__), child_args)
                print(f"[{size}] memory {which}: {mem[which]}", flush=True)
            for which, m in mem.items():
                mem_rows.append((f"{size}x{size}", which, f"{m['peak_mb']:.0f}", f"{m['rss_before_mb']:.0f}",
                                 f"{m['peak_mb'] - m['rss_before_mb']:.0f}",
                                 f"{m['peak_mb'] / mem['hand']['peak_mb']:.3f}"))

    md += ["## Same loss (apples to apples)", "",
           "Loss of the first batch, and of the second batch after one optimizer step, from fresh copies of "
           "the same initial weights (trainer: `training_step`; hand: the hand loop).", "",
           C.md_table(["image", "trainer loss 1", "hand loss 1", "abs diff", "trainer loss 2", "hand loss 2",
                       "abs diff", "<= 1e-5"], check_rows), ""]
    md += ["## Step: `training_step` + `optimizer.step()` + `zero_grad()` vs hand step", "",
           C.md_table(TIMING_HEAD, step_rows), ""]
    md += ["## Whole `trainer.train()` loop (steady state) vs hand loop", "",
           "Trainer defaults kept: `max_grad_norm=1.0` (clip + grad norm each step), linear lr schedule, "
           "callbacks, accelerate dataloader; `logging_steps=10`. The hand loop does none of these. The hand "
           "steps run one by one from a trainer callback at each `on_step_end`; a trainer step is timed from "
           "the end of the previous hand step to its own `on_step_end`.", "",
           C.md_table(TIMING_HEAD + ["train() fixed cost s per call (set-up + teardown, wall)"], loop_rows), "",
           "Same run, third runner: the hand loop plus `torch.nn.utils.clip_grad_norm_(params, 1.0)` before "
           "`optimizer.step()` (the math the Trainer does by default). trainer / (hand + clip) is the cost of "
           "the Trainer's own machinery (dataloader, callbacks, scheduler, logging, bookkeeping).", "",
           C.md_table(["image", "clock", "trainer ms/step", "hand + clip ms/step", "hand ms/step",
                       "(hand + clip) / hand (paired)", "trainer / (hand + clip) (paired)", "per-repetition"],
                      clip_table), ""]
    if mem_rows:
        md += ["## Peak memory (fresh process per configuration, `VmHWM`)", "",
               f"Each runs {min(args.steps, 7) + args.loop_warmup} steps; 'before' = RSS after building models, batches, "
               "trainer/optimizer, just before the first step. glibc allocator defaults in these processes. "
               "(`VmHWM`, not `ru_maxrss`: Linux carries a parent's maxrss into a child across fork+exec.)", "",
               C.md_table(["image", "configuration", "peak RSS MiB", "RSS before steps MiB", "peak - before MiB",
                           "peak / hand peak"], mem_rows), ""]

    # Where the trainer spends its time outside the models (always reported; small run).
    prof_steps = 8 if args.quick else 20
    rows, (own_ms, total_ms), top = profile_trainer(args, args.sizes[0], out_dir, prof_steps)
    step_ms = float(step_rows[0][2])
    md += [f"## cProfile of `trainer.train()` ({prof_steps} steps, {args.sizes[0]}x{args.sizes[0]})", "",
           f"Cumulative / own time per step of the Trainer-side Python functions (hf_distill, transformers "
           "Trainer, accelerate, optimizer, clipping, dataloader); cProfile inflates Python-heavy code, so read "
           f"the ms as upper bounds (wall clock under cProfile: {total_ms:.0f} ms per step vs ~{step_ms:.0f} ms timed "
           "above, from profiling overhead and the machine's load at that moment). The model forward/backward "
           "run inside `compute_loss` / `accelerator.backward`; calls/step < 1 are once-per-`train()` costs.", "",
           f"Own time of all Trainer-side bookkeeping frames (hf_distill trainer/methods/teacher/models, "
           f"transformers `trainer*.py`, accelerate), excluding the torch work they call: **{own_ms:.2f} ms/step** "
           f"under cProfile, i.e. {100 * own_ms / total_ms:.2f}% of the profiled step.", "",
           C.md_table(["cumulative ms/step", "own ms/step", "calls/step", "function"],
                      [(f"{c:.2f}", f"{o:.3f}", f"{n:.2f}", f) for c, o, n, f in rows[:30]]), ""]
    print(top)

    C.finish_report(md, ratios, 1.05, "trainer / hand", t_start, args.out)


if __name__ == "__main__":
    main()
