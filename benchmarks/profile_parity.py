"""Where hf_distill's KD step spends time that timm's ``LogitDistillationTask`` loop does not.

    python benchmarks/profile_parity.py --pair 0 --steps 12      # one pair of bench_timm_parity.PAIRS

Runs the two runners of ``bench_timm_parity`` (same models, batches, optimizer, no clipping) under

* ``torch.profiler`` (CPU activities): self CPU time and call count per aten op, per step, for each loop,
  and the ops whose count or time differs between them (the extra tensor work of the Trainer step);
* ``cProfile``: Python functions of the hf_distill loop outside torch's ops (the per-step machinery of
  ``transformers.Trainer`` / ``accelerate`` / ``hf_distill``), time per step and calls per step.

Counts are exact whatever the machine load; times are CPU time of this process (``uptime`` printed with
them, the machine is shared). Not a timing benchmark: see bench_timm_parity.py for the ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import _bench_common as C  # noqa: E402
import bench_timm_parity as P  # noqa: E402
import torch  # noqa: E402


def uptime() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def op_table(runner, warmup: int) -> tuple[dict[str, tuple[float, int]], float]:
    """{op: (self CPU us per step, calls per step)} over one loop of the runner, and its steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.run(warmup)
    steps = len(runner_batches(runner))
    out = {}
    for e in prof.key_averages():
        out[e.key] = (e.self_cpu_time_total / steps, e.count / steps)
    return out, steps


def runner_batches(runner):
    return runner.batches if hasattr(runner, "batches") else runner.trainer.train_dataset.batches


def python_table(runner, warmup: int, top: int, include=("transformers", "accelerate", "hf_distill", "_bench",
                                                           "bench_timm", "torch/utils/data", "torch/optim",
                                                           "torch/nn/utils", "torch/nn/modules/module.py")):
    """cProfile of one loop: the functions of the step machinery (by path), own time and calls per step."""
    prof = cProfile.Profile()
    steps = len(runner_batches(runner)) - 1
    if hasattr(runner, "trainer"):  # the steps only: from the first step's end to the last's (not train()'s set-up)
        from transformers import TrainerCallback

        class _Window(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 1:
                    prof.enable()
                elif state.global_step == state.max_steps:
                    prof.disable()

        cb = _Window()
        runner.trainer.add_callback(cb)
        runner.run(warmup)
        runner.trainer.remove_callback(cb)
    else:
        batches = runner.batches
        runner.batches = batches[:1]
        runner.run(warmup)  # the first step outside the window, as for the Trainer
        runner.batches = batches[1:]
        prof.enable()
        runner.run(warmup)
        prof.disable()
        runner.batches = batches
    st = pstats.Stats(prof)
    rows = []
    for (path, line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():
        if any(s in path for s in include):
            short = path.split("site-packages/")[-1].replace(os.getcwd() + "/", "")
            rows.append((ct / steps * 1e3, tt / steps * 1e3, nc / steps, f"{short}:{line}({fn})"))
    total = sum(tt for (_p, _l, _f), (_c, _n, tt, _ct, _cl) in st.stats.items()) / steps * 1e3
    return sorted(rows, reverse=True)[:top], total, st


def pieces(a, teacher, student, batches, out_dir):
    """ms/step (CPU time and wall) of timm's loop and of each Trainer variant, interleaved by repetition."""
    import statistics

    from _parity_patches import PIECES, PROPOSED

    variants = a.variants if a.variants is not None else (
        [""] + list(PIECES) + ["+".join(PROPOSED), "+".join(PIECES)])
    runners = {"timm": P.Timm(teacher, student, batches)}
    for v in variants:
        names = [x for x in v.split("+") if x]
        runners["hf " + (v or "as is")] = P.HF(teacher, student, batches, out_dir, pieces=names)
    t0 = time.perf_counter()
    times = P.interleaved(runners, a.reps, 2)
    load = uptime()
    base = times["cpu"]["timm"]
    ref = times["cpu"].get("hf as is")
    print(f"\n## pieces: {a.reps} repetitions x {a.steps - 2} steps, CPU clock; load at end {load}, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| runner | ms/step (median) | - timm ms/step (paired median) | / timm (paired median) | spread of / timm "
          "| vs hf as is ms/step (paired median) | wall ms/step |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times["cpu"].items():
        d = statistics.median(x - y for x, y in zip(ts, base))
        r = [x / y for x, y in zip(ts, base)]
        dr = statistics.median(x - y for x, y in zip(ts, ref)) if ref else float("nan")
        print(f"| {name} | {statistics.median(ts):.3f} | {d:+.3f} | {statistics.median(r):.4f} | "
              f"{min(r):.4f}-{max(r):.4f} | {dr:+.3f} | {statistics.median(times['wall'][name]):.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", type=int, default=0, help="index into bench_timm_parity.PAIRS")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--what", choices=["ops", "python", "both", "pieces"], default="both",
                   help="pieces: ms/step of timm's loop and of the Trainer with each piece switched off, interleaved")
    p.add_argument("--tiny", action="store_true", help="linear student and teacher (the loops' own overhead)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="pieces mode: runner specs, '+'-joined _parity_patches.PIECES names ('' = as is)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--callers", nargs="*", default=None, help="pstats print_callers restrictions (hf_distill loop)")
    a = p.parse_args(argv)
    a.threads, a.malloc, a.child = 1, "steady", None
    C.prepare_process(a)
    teacher_name, student_name, size = ("linear", "linear", 16) if a.tiny else P.PAIRS[a.pair]
    teacher, student = P.make(teacher_name, size, 0), P.make(student_name, size, 1)
    batches = C.make_batches(a.steps, a.batch_size, size, seed=3)
    out_dir = C.tmpdir("hfd_prof_")
    print(f"# {teacher_name} -> {student_name} {size}px, batch {a.batch_size}, {a.steps} steps; load {uptime()}")
    if a.what == "pieces":
        return pieces(a, teacher, student, batches, out_dir)
    hf, tm = P.HF(teacher, student, batches, out_dir), P.Timm(teacher, student, batches)
    hf.run(0), tm.run(0)  # warm
    if a.what in ("ops", "both"):
        t_hf, _ = op_table(hf, 0)
        t_tm, _ = op_table(tm, 0)
        tot_hf = sum(v[0] for v in t_hf.values())
        tot_tm = sum(v[0] for v in t_tm.values())
        print(f"\n## aten/profiler self CPU per step: hf_distill {tot_hf / 1e3:.2f} ms, timm {tot_tm / 1e3:.2f} ms "
              f"(load {uptime()})")
        keys = set(t_hf) | set(t_tm)
        diff = []
        for k in keys:
            (th, ch), (tt, ct) = t_hf.get(k, (0.0, 0.0)), t_tm.get(k, (0.0, 0.0))
            if abs(ch - ct) > 1e-9 or abs(th - tt) > 200:
                diff.append((th - tt, k, th, ch, tt, ct))
        print("| op | hf us/step | hf calls/step | timm us/step | timm calls/step | diff us |")
        print("|---|---|---|---|---|---|")
        for d, k, th, ch, tt, ct in sorted(diff, key=lambda r: -abs(r[0]))[:a.top]:
            print(f"| `{k}` | {th:.0f} | {ch:.2f} | {tt:.0f} | {ct:.2f} | {d:+.0f} |")
    if a.what in ("python", "both"):
        for name, r in (("hf_distill", hf), ("timm", tm)):
            rows, total, st = python_table(r, 0, a.top)
            if a.callers and name == "hf_distill":
                st.print_callers(*a.callers)
            print(f"\n## cProfile {name}: total own time {total:.2f} ms/step (load {uptime()})")
            print("| function | cum ms/step | own ms/step | calls/step |")
            print("|---|---|---|---|")
            for ct, tt, nc, fn in rows:
                print(f"| `{fn}` | {ct:.3f} | {tt:.3f} | {nc:.1f} |")


if __name__ == "__main__":
    main()
