"""Past one process, measured on CPU: sharded-teacher memory, parallel cache builds, streaming step time.

    python benchmarks/bench_scale.py [sharded] [cache] [stream]     (all three by default)

* ``sharded``: a ViT-B/16 teacher (86M parameters, random init, 64px) and a ResNet-10t student, KD
  for a few steps under ``torchrun --nproc_per_node 2`` with the teacher replicated and sharded
  (``teacher_sharding="fsdp"``): teacher parameters and bytes held per process, peak resident
  memory per process, step time. Also the 1-process replicated run.
* ``cache``: ``build_teacher_cache`` over the digits training split (1437 images x 3 epochs of random
  views, ResNet-18 teacher at 64px, default shard size) by 1 process and by 2 processes
  (``torchrun``), each with one thread: views/s and ratio.
* ``stream``: KD steps per second from the same data as a map-style ``Dataset`` and as a stream
  (``IterableDataset``), in memory and from an image folder on disk; runs interleaved, one thread.

Every process uses one thread (OMP_NUM_THREADS=1). Writes benchmarks/results/bench_scale.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _torchrun() -> str:
    return shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, *args: str) -> None:
    cmd = ([_torchrun(), "--nproc_per_node", str(n), "--master_addr", "127.0.0.1", "--master_port", str(_port())]
           if n > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run([*cmd, os.path.abspath(__file__), "--worker", *args], env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """Resident memory now, after freed memory is handed back to the OS (glibc keeps it otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------ sharded
def _sharded_worker(sharding: str, out: str) -> None:
    import timm

    from hf_distill import DistillationTrainer, DistillationTrainingArguments
    from hf_distill.data import digits_dataset, with_image_transform
    from hf_distill.models import InputSpec, set_input_spec
    from hf_distill.teachers.sharding import local_parameter_count
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    spec = InputSpec(mean=(0.5,) * 3, std=(0.5,) * 3, image_size=(64, 64), in_chans=3)
    torch.manual_seed(0)
    teacher = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=64)
    set_input_spec(teacher, spec)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    set_input_spec(student, spec)
    train = with_image_transform(digits_dataset()["train"].select(range(64)), spec)
    args = DistillationTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=6, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", teacher_sharding=sharding,
        eval_teacher=False, dataloader_num_workers=0)
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  callbacks=[Clock()])
    held = sum(local_parameter_count(t) for t in trainer.teachers.models)
    held_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes
                     for t in trainer.teachers.models for p in t.parameters())
    rss_before, peak_before = _rss_mib(), _peak_rss_mib()
    trainer.train()
    rss_after = _rss_mib()
    steps = [b - a for a, b in zip(times[1:], times[2:])]  # after the first step
    result = {"sharding": sharding, "world": trainer.accelerator.num_processes, "rank": _rank(),
              "teacher_params": sum(p.numel() for p in teacher.parameters()), "teacher_params_held": held,
              "teacher_mib_held": held_bytes / 2**20, "peak_rss_mib": _peak_rss_mib(),
              "rss_before_train_mib": rss_before, "peak_rss_before_train_mib": peak_before, "rss_after_train_mib": rss_after,
              "step_s": sorted(steps)[len(steps) // 2]}
    with open(f"{out}.rank{_rank()}", "w") as f:
        json.dump(result, f)


def bench_sharded() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, sharding in ((1, "none"), (2, "none"), (2, "fsdp")):
            out = os.path.join(tmp, f"{n}_{sharding}")
            _launch(n, "sharded", sharding, out)
            for rank in range(n):
                with open(f"{out}.rank{rank}") as f:
                    rows.append(json.load(f))
    return rows


# ------------------------------------------------------------------------------------------- cache
def _cache_worker(cache_dir: str, out: str) -> None:
    import timm

    from hf_distill.data import digits_dataset
    from hf_distill.models import InputSpec, set_input_spec
    from hf_distill.teacher_cache import build_teacher_cache

    torch.set_num_threads(1)
    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(64, 64), in_chans=1)
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    set_input_spec(teacher, spec)
    train = digits_dataset()["train"]
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, train, spec, cache_dir, epochs=3, augmentation="timm", batch_size=64, seed=0)
    seconds = time.perf_counter() - start
    if _rank() == 0:
        with open(out, "w") as f:
            json.dump({"images": len(cache), "seconds": seconds, "shards": cache.manifest["num_shards"]}, f)


def bench_cache() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(2):
            for n in (1, 2):
                out = os.path.join(tmp, f"c{n}_{repeat}.json")
                _launch(n, "cache", os.path.join(tmp, f"cache{n}_{repeat}"), out)
                with open(out) as f:
                    r = json.load(f)
                rows.append({"processes": n, "repeat": repeat, **r, "images_per_s": r["images"] / r["seconds"]})
    return rows


# ------------------------------------------------------------------------------------------ stream
def bench_stream(steps: int = 40) -> list[dict]:
    import timm

    from hf_distill import DistillationTrainer, DistillationTrainingArguments
    from hf_distill.data import digits_dataset, load_image_dataset, with_image_transform
    from hf_distill.models import InputSpec, set_input_spec

    torch.set_num_threads(1)
    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(32, 32), in_chans=1)
    train = digits_dataset()["train"]
    folder = tempfile.mkdtemp()
    for i in range(len(train)):
        example = train[i]
        os.makedirs(os.path.join(folder, "train", str(example["label"])), exist_ok=True)
        example["image"].save(os.path.join(folder, "train", str(example["label"]), f"{i:05d}.png"))
    sources = {
        "memory, map-style": lambda: train,
        "memory, stream": lambda: train.to_iterable_dataset(num_shards=4),
        "image folder, map-style": lambda: load_image_dataset(folder)["train"],
        "image folder, stream": lambda: load_image_dataset(folder, streaming=True)["train"],
    }
    rows = []
    for repeat in range(2):
        for name, make in sources.items():
            torch.manual_seed(0)
            teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
            student = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
            for m in (teacher, student):
                set_input_spec(m, spec)
            data = make()
            if hasattr(data, "n_shards"):
                data = data.shuffle(seed=0, buffer_size=1000)
            args = DistillationTrainingArguments(
                output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, max_steps=steps + 2,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
                eval_teacher=False, dataloader_num_workers=0)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=with_image_transform(data, spec, training=True))
            from transformers import TrainerCallback

            marks = {}

            class Clock(TrainerCallback):
                def on_step_end(self, a, state, control, **k):
                    if state.global_step == 2:
                        marks["start"] = time.perf_counter()

            trainer.add_callback(Clock())
            trainer.train()
            seconds = time.perf_counter() - marks["start"]
            rows.append({"source": name, "repeat": repeat, "steps_per_s": steps / seconds})
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------- report
def report(results: dict) -> str:
    lines = ["# bench_scale: past one process (CPU)", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
             "one thread per process. Generated by `python benchmarks/bench_scale.py`.", ""]
    if "sharded" in results:
        lines += ["## Sharded teacher (ViT-B/16, 86M parameters, 64px; ResNet-10t student; KD, batch 8)", "",
                  "| run | rank | teacher parameters held | teacher MiB held | RSS MiB before / after training | "
                  "peak RSS MiB | median step s |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["sharded"]:
            lines.append(f"| {r['world']} process(es), {r['sharding']} | {r['rank']} | "
                         f"{r['teacher_params_held']:,} / {r['teacher_params']:,} "
                         f"({r['teacher_params_held'] / r['teacher_params']:.3f}) | {r['teacher_mib_held']:.0f} | "
                         f"{r['rss_before_train_mib']:.0f} / {r['rss_after_train_mib']:.0f} | "
                         f"{r['peak_rss_mib']:.0f} | {r['step_s']:.3f} |")
        lines += ["", "RSS: the process's resident memory after garbage collection and `malloc_trim` (freed "
                  "memory handed back to the OS). Peak RSS: the most the process ever held. Every process builds "
                  "the whole teacher before sharding it (peak before training: "
                  + ", ".join(f"{r['peak_rss_before_train_mib']:.0f}" for r in results["sharded"]) + " MiB in the "
                  "rows' order). During training the sharded runs' peak rises: each forward gathers one block at a "
                  "time and frees it (checked: every block is resharded, unsharded storage 0 bytes), but glibc keeps "
                  "the freed gather buffers until `malloc_trim`. On GPUs PyTorch's caching allocator reuses them.", ""]
    if "cache" in results:
        by = {n: [r["images_per_s"] for r in results["cache"] if r["processes"] == n] for n in (1, 2)}
        shards = results["cache"][0].get("shards", "?")
        lines += ["## Teacher-output cache build (digits train, 1437 images x 3 epochs of random views, ResNet-18 "
                  f"at 64px, {shards} shards)", "", "Build time only (after loading), wall clock of the whole build.", "",
                  "| processes | views/s (each repeat) |", "|---|---|"]
        lines += [f"| {n} | {', '.join(f'{v:.1f}' for v in vals)} |" for n, vals in by.items()]
        ratio = (sum(by[2]) / len(by[2])) / (sum(by[1]) / len(by[1]))
        lines += ["", f"2 processes / 1 process throughput: {ratio:.2f}", ""]
        results["cache_ratio"] = ratio
    if "stream" in results:
        names = list(dict.fromkeys(r["source"] for r in results["stream"]))
        mean = {n: sum(r["steps_per_s"] for r in results["stream"] if r["source"] == n) /
                sum(1 for r in results["stream"] if r["source"] == n) for n in names}
        lines += ["## Streaming vs map-style (KD, ResNet-18 -> ResNet-10t, 32px, batch 32, 40 timed steps)", "",
                  "| source | steps/s (mean of 2, interleaved) | vs map-style |", "|---|---|---|"]
        for n in names:
            base = mean[n.replace("stream", "map-style")]
            lines.append(f"| {n} | {mean[n]:.2f} | {mean[n] / base:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        (_sharded_worker if kind == "sharded" else _cache_worker)(*rest)
        return
    parts = sys.argv[1:] or ["sharded", "cache", "stream"]
    path = os.path.join(RESULTS, "bench_scale.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for part in parts:
        results[part] = {"sharded": bench_sharded, "cache": bench_cache, "stream": bench_stream}[part]()
    results["ran_beside"] = os.environ.get("BENCH_BESIDE", "nothing else (quiet machine)")
    text = report(results)
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(RESULTS, "bench_scale.md"), "w") as f:
        f.write(text + f"\nRan beside: {results['ran_beside']}.\n")
    print(text)


if __name__ == "__main__":
    main()
