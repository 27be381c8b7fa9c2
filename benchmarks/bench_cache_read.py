"""Reading a teacher-output cache: peak memory for ONE item, and time per training batch (CPU).

    python benchmarks/bench_cache_read.py [--items 50000] [--classes 1000] [--old PATH]

Builds (once, with ``build_teacher_cache``) a cache of ``--items`` 8x8 grey images and a linear
teacher of ``--classes`` outputs (one item: ``classes`` float32 logits plus its view columns), then
measures, each in a fresh process:

* ``one item``: the peak resident memory (``ru_maxrss``) added by reading one item
  (``cache.entry(0, i)``) after the cache is opened;
* ``batch of 64``: the time of ``TeacherCacheDataset.__getitems__`` for 64 random items (views
  replayed, logits read), median of 30 batches after 3 warm-up batches.

``--old PATH`` measures an hf_distill checkout at PATH (its parent directory on ``sys.path``) side
by side with this one, e.g. a ``git archive`` of an earlier commit. Writes
benchmarks/results/bench_cache_read.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

MEASURE = r"""
import json, resource, statistics, sys, time
import numpy as np
import torch
from hf_distill.models import InputSpec
from hf_distill.teacher_cache import load_teacher_cache, with_teacher_cache
from datasets import load_from_disk
torch.set_num_threads(1)
cache_dir, raw_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(8, 8), in_chans=1)
cache = load_teacher_cache(cache_dir)
raw = load_from_disk(raw_dir)
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if mode == "item":
    before = rss_mb()
    row = cache.entry(0, 12345)
    logits = cache.logits_of(row)
    print(json.dumps({"peak_rss_added_mb": rss_mb() - before, "item_bytes": int(logits.numel() * 4)}))
else:
    data = with_teacher_cache(raw, cache, spec)
    rng = np.random.default_rng(0)
    times = []
    for i in range(33):
        keys = rng.integers(0, len(data), 64).tolist()
        t0 = time.perf_counter()
        data.__getitems__(keys)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"batch_ms": 1000 * statistics.median(times)}))
"""


def build(folder: str, items: int, classes: int) -> tuple[str, str]:
    import numpy as np
    import torch
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from hf_distill.models import InputSpec, set_input_spec
    from hf_distill.teacher_cache import build_teacher_cache

    raw_dir, cache_dir = os.path.join(folder, "raw"), os.path.join(folder, "cache")
    if os.path.exists(os.path.join(cache_dir, "cache_info.json")):
        return raw_dir, cache_dir
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L") for _ in range(items)]
    raw = Dataset.from_dict({"image": images, "label": [int(i % classes) for i in range(items)]},
                            features=Features({"image": Image(), "label": Value("int64")}))
    raw.save_to_disk(raw_dir)
    raw = __import__("datasets").load_from_disk(raw_dir)
    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(8, 8), in_chans=1)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes))
    set_input_spec(teacher, spec)
    build_teacher_cache(teacher, raw, spec, cache_dir, batch_size=500)
    return raw_dir, cache_dir


def measure(code_root: str, cache_dir: str, raw_dir: str, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code_root)
    # run from elsewhere: the working directory would come first on sys.path
    out = subprocess.run([sys.executable, "-c", MEASURE, cache_dir, raw_dir, mode], env=env, capture_output=True,
                         text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--old", default=None, help="an older hf_distill package folder to compare with")
    parser.add_argument("--workdir", default=None, help="where the cache is built (kept: reused next time)")
    a = parser.parse_args()
    folder = a.workdir or tempfile.mkdtemp(prefix="bench_cache_read_")
    raw_dir, cache_dir = build(folder, a.items, a.classes)
    versions = {"this": ROOT} | ({"old": os.path.dirname(os.path.abspath(a.old))} if a.old else {})
    results = {"items": a.items, "classes": a.classes, "versions": {}}
    for name, root in versions.items():
        item = measure(root, cache_dir, raw_dir, "item")
        batch = measure(root, cache_dir, raw_dir, "batch")
        results["versions"][name] = {**item, **batch, "ratio_to_item": item["peak_rss_added_mb"] * 2**20
                                     / item["item_bytes"]}
        print(name, results["versions"][name], flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_cache_read.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Reading one item of a {a.items:,}-item teacher cache ({a.classes} classes)", "",
             "| version | peak RSS added by one item (MB) | item (KB) | ratio | batch of 64 (ms) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results["versions"].items():
        lines.append(f"| {name} | {r['peak_rss_added_mb']:.1f} | {r['item_bytes'] / 1024:.1f} | "
                     f"{r['ratio_to_item']:.0f}x | {r['batch_ms']:.1f} |")
    with open(os.path.join(RESULTS, "bench_cache_read.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
