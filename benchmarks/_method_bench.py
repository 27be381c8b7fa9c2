"""Shared pieces of ``bench_byot.py`` and ``bench_sftn.py`` (Fashion-MNIST, CPU, offline).

Not a test and not part of the package: imported by the two scripts (run as scripts, so this
folder is on ``sys.path``). Data come from :mod:`fashion_mnist` (``load_fashion_mnist``).

* :class:`FlipImages`: pre-normalised image tensors as ``{"pixel_values", "labels"}`` examples with
  random horizontal flips drawn from the global torch RNG (seeded by the Trainer). Given the
  teacher's logits on the plain *and* the flipped image it adds ``teacher_logits`` for the image
  actually returned: the trainer then reads soft labels from the batch instead of running the
  teacher (``DistillationTrainer.compute_loss``'s cached-logit path).
* :class:`CachedFeatureTeacher`: a frozen teacher replayed from its precomputed logits *and* one
  hidden feature map (looked up by the exact input image), with a submodule of the hidden layer's
  name so FitNets' forward hook sees the cached feature. Checked against the live teacher.
* :class:`Sweep`: every finished run is written to the JSON at once; a rerun with the same
  settings skips runs already there.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fashion_mnist import (  # noqa: E402, F401  (CACHE_ROOT is re-exported for the scripts)
    CACHE_ROOT, CLASS_NAMES, MEAN, STD, load_fashion_mnist, stratified_subset, to_tensors,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments, InputSpec, set_input_spec  # noqa: E402
from hf_distill.models import count_parameters, set_label_names  # noqa: E402

RESULTS_DIR = HERE / "results"
IMAGE_SIZE = 28
SPEC = InputSpec(mean=(MEAN,), std=(STD,), image_size=(IMAGE_SIZE, IMAGE_SIZE), in_chans=1)

log = logging.getLogger("bench")


def read_notes(path: str | None) -> list[str]:
    """A report's notes file as one note per paragraph (each joined onto one line); none without a file."""
    if not path:
        return []
    return [n.strip().replace("\n", " ") for n in Path(path).read_text().split("\n\n") if n.strip()]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "hf_distill", "timm", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")


# ============================================================================ data
_DATA: dict = {}


def data(train_subset: int | None, test_subset: int | None = None, subset_seed: int = 0):
    """(train x, train y, test x, test y): normalised [N,1,28,28] tensors; stratified subsets."""
    key = (train_subset, test_subset, subset_seed)
    if key not in _DATA:
        dsd = load_fashion_mnist()
        train = dsd["train"] if not train_subset else stratified_subset(dsd["train"], train_subset, seed=subset_seed)
        test = dsd["test"] if not test_subset else stratified_subset(dsd["test"], test_subset, seed=subset_seed)
        _DATA[key] = (*to_tensors(train), *to_tensors(test))
    return _DATA[key]


class FlipImages(torch.utils.data.Dataset):
    """Images (optionally randomly h-flipped) with labels, and optionally the teacher's cached logits.

    ``logits``: ``(logits on x, logits on x.flip(-1))``, each [N, C]; the one matching the
    returned image is added as ``teacher_logits``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, hflip: bool = False, logits=None):
        self.x, self.y, self.hflip, self.logits = x, y, hflip, logits

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        flip = bool(self.hflip and torch.rand(()) < 0.5)  # global torch RNG: seeded by the Trainer
        img = self.x[i].flip(-1) if flip else self.x[i]
        item = {"pixel_values": img, "labels": int(self.y[i])}
        if self.logits is not None:
            item["teacher_logits"] = self.logits[int(flip)][i]
        return item


# ============================================================================ models
def prepare(model: nn.Module) -> nn.Module:
    set_input_spec(model, SPEC)
    set_label_names(model, CLASS_NAMES)
    return model


def make_timm(arch: str, seed: int, **kw) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return prepare(timm.create_model(arch, pretrained=False, num_classes=10, in_chans=1, **kw))


@torch.no_grad()
def batched(model: nn.Module, x: torch.Tensor, layer: str | None = None, bs: int = 1000):
    """Eval-mode logits of ``model`` on ``x`` (and the output of module ``layer`` when given)."""
    from hf_distill.models import call_model
    from hf_distill.models.taps import FeatureTaps

    model.eval()
    logits, feats = [], []
    taps = FeatureTaps(model, [layer], detach=True) if layer else None
    for i in range(0, len(x), bs):
        logits.append(call_model(model, x[i:i + bs]).float())
        if taps is not None:
            feats.append(taps.pop()[layer].float())
    if taps is not None:
        taps.remove()
    return torch.cat(logits), (torch.cat(feats) if feats else None)


def flip_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batched(model, x)[0], batched(model, x.flip(-1))[0]


class CachedFeatureTeacher(nn.Module):
    """A frozen teacher replayed from cached logits and one cached hidden feature map.

    ``forward(x)`` looks every image up by its bytes, passes the cached feature through the
    identity submodule named ``layer`` (so forward hooks on that name see it) and returns the
    cached logits. Images not in the table (the trainer's dry probe on zeros) get the right
    shapes filled with zeros and are counted in ``misses``.
    """

    def __init__(self, layer: str, images: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor):
        super().__init__()
        if "." in layer:
            raise ValueError("layer must be a top-level module name")
        self.layer = layer
        self.add_module(layer, nn.Identity())
        self.register_buffer("logit_table", logits.float(), persistent=False)
        self.register_buffer("feat_table", feats.float(), persistent=False)
        self.index = {images[i].numpy().tobytes(): i for i in range(len(images))}
        self.num_classes = logits.shape[1]
        self.misses = 0
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a dtype

    def forward(self, x):
        rows = [self.index.get(img.numpy().tobytes(), -1) for img in x.detach().cpu().float().contiguous()]
        idx = torch.tensor([max(r, 0) for r in rows])
        bad = torch.tensor([r < 0 for r in rows])
        feats, logits = self.feat_table[idx].clone(), self.logit_table[idx].clone()
        if bad.any():
            self.misses += int(bad.sum())
            feats[bad], logits[bad] = 0.0, 0.0
        getattr(self, self.layer)(feats)
        return logits


def cached_feature_teacher(live: nn.Module, layer: str, x: torch.Tensor, check: int = 256) -> CachedFeatureTeacher:
    """Cache ``live``'s logits and ``layer`` output on ``x`` and ``x`` flipped; check against the live teacher."""
    images = torch.cat([x, x.flip(-1)]).contiguous()
    logits, feats = batched(live, images, layer)
    cached = CachedFeatureTeacher(layer, images, logits, feats)
    # check: the same numbers as the live network on a random mix of plain and flipped images
    g = torch.Generator().manual_seed(1234)
    pick = images[torch.randperm(len(images), generator=g)[:check]]
    want_logits, want_feats = batched(live, pick, layer, bs=128)
    from hf_distill.models.taps import FeatureTaps

    with torch.no_grad(), FeatureTaps(cached, [layer], detach=True) as taps:
        got_logits = cached(pick)
        got_feats = taps.pop()[layer]
    diff = max((got_logits - want_logits).abs().max().item(), (got_feats - want_feats).abs().max().item())
    if cached.misses or not diff < 1e-3:
        raise RuntimeError(f"cached teacher differs from the live one (max diff {diff}, misses {cached.misses})")
    cached.check_max_diff = diff
    return cached


# ============================================================================ training
def make_args(out: str, method: str, epochs: float, seed: int, lr: float = 2e-3, batch: int = 128, **kw):
    return DistillationTrainingArguments(
        output_dir=out, distill_method=method, num_train_epochs=epochs, per_device_train_batch_size=batch,
        per_device_eval_batch_size=500, learning_rate=lr, weight_decay=kw.pop("weight_decay", 0.05),
        lr_scheduler_type="cosine", warmup_steps=kw.pop("warmup_steps", 0.03), logging_steps=kw.pop("logging_steps", 25),
        eval_strategy="no", save_strategy="no", report_to=[], seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=True, eval_teacher=False, **kw,
    )


class CallCounter:
    """Counts forward calls of a module (to prove that a cached-logit run never ran the teacher)."""

    def __init__(self, module: nn.Module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def remove(self):
        self.handle.remove()


def train_eval(student, teacher, args, train_ds, test_ds, keep_trainer: bool = False) -> dict:
    """Train, then one evaluation on the test set. CPU seconds (this process) and wall seconds of each."""
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_ds)
    if isinstance(teacher, CachedFeatureTeacher):
        teacher.misses = 0  # the dry probe at construction used zeros
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.train()
    train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
    if isinstance(teacher, CachedFeatureTeacher) and teacher.misses:
        raise RuntimeError(f"{teacher.misses} training images were not in the teacher cache")
    c1, w1 = time.process_time(), time.perf_counter()
    metrics = trainer.evaluate(eval_dataset=test_ds)
    eval_cpu, eval_wall = time.process_time() - c1, time.perf_counter() - w1
    logs = [h for h in trainer.state.log_history if "loss" in h]
    res = {
        "accuracy": metrics["eval_accuracy"],
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "train_cpu_s": train_cpu, "train_wall_s": train_wall, "eval_cpu_s": eval_cpu, "eval_wall_s": eval_wall,
        "epochs": args.num_train_epochs, "steps": trainer.state.global_step,
        "params": count_parameters(trainer.student),
        "trainable_extra_params": count_parameters(trainer.extra_modules),
        "loss_log": [{k: v for k, v in h.items() if k.startswith("loss") or k in ("step", "epoch", "learning_rate")}
                     for h in logs],
    }
    if keep_trainer:
        res["_trainer"] = trainer
    return res


# ============================================================================ bookkeeping
def git_state() -> dict:
    root = HERE.parent

    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            return ""

    return {"commit": run("git", "rev-parse", "HEAD"),
            "dirty_library_files": run("git", "status", "--short", "hf_distill").splitlines()}


def environment() -> dict:
    import timm
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "nproc": os.cpu_count(), "loadavg_at_start": load}


class Sweep:
    """(config, seed) results kept in ``results/<name>.json`` as they finish; same settings: resume.

    Several processes may fill one sweep at once (e.g. different seeds on the two cores): each
    save merges, under a file lock, the runs and extras already in the file with this process's.
    ``meta["invocations"]`` keeps each process's CPU and wall seconds.
    """

    def __init__(self, name: str, settings: dict):
        self.name = name
        self.path = RESULTS_DIR / f"{name}.json"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        self.settings = json.loads(json.dumps(settings))
        old = self._read()
        self.runs: list[dict] = old.get("runs", [])
        self.extra: dict = old.get("extra", {})
        now = {"git": git_state(), "environment": environment(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        first = old.get("meta", {}) if self.runs else {}
        # git state and machine load of the invocation that produced the first runs; the latest one apart
        self.meta = {k: first.get(k, now[k]) for k in now}
        self.meta["last_invocation"] = now
        self.meta["invocations"] = dict(old.get("meta", {}).get("invocations", {}))
        self.key = f"{now['started']} pid {os.getpid()}"
        self.t0_cpu, self.t0_wall = time.process_time(), time.perf_counter()

    def _read(self) -> dict:
        """The file's content when it holds these settings, else nothing."""
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        if old.get("settings") != self.settings:
            return {}
        meta = old.get("meta", {})
        if "invocations" not in meta and "total_cpu_s" in meta:  # written before invocations were kept
            meta["invocations"] = {"earlier": {"cpu_s": meta["total_cpu_s"], "wall_s": meta["total_wall_s"]}}
        return old

    def get(self, config: str, seed: int) -> dict | None:
        for r in self.runs:
            if r["config"] == config and r["seed"] == seed:
                return r
        return None

    def add(self, config: str, seed: int, result: dict) -> dict:
        result = {"config": config, "seed": seed, **{k: v for k, v in result.items() if not k.startswith("_")}}
        self.runs.append(result)
        self.save()
        log.info("%s | %-22s seed %d: %.2f%% (train %.0f s CPU / %.0f s wall)", self.name, config, seed,
                 100 * result["accuracy"], result["train_cpu_s"], result["train_wall_s"])
        return result

    def save(self) -> None:
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = self._read()
            mine = {(r["config"], r["seed"]) for r in self.runs}
            self.runs += [r for r in disk.get("runs", []) if (r["config"], r["seed"]) not in mine]
            self.extra = {**disk.get("extra", {}), **self.extra}
            invocations = {**disk.get("meta", {}).get("invocations", {}), **self.meta["invocations"]}
            invocations[self.key] = {"cpu_s": time.process_time() - self.t0_cpu,
                                     "wall_s": time.perf_counter() - self.t0_wall, "command": self.meta.get("command")}
            self.meta["invocations"] = invocations
            self.meta["total_cpu_s"] = sum(v["cpu_s"] for v in invocations.values())
            self.meta["total_wall_s"] = sum(v["wall_s"] for v in invocations.values())
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"settings": self.settings, "meta": self.meta, "extra": self.extra,
                                       "runs": self.runs}, indent=1, default=str))
            tmp.replace(self.path)

    def values(self, config: str, key: str = "accuracy", metric: str | None = None) -> dict[int, float]:
        out = {}
        for r in self.runs:
            if r["config"] == config:
                out[r["seed"]] = r["metrics"][metric] if metric else r[key]
        return dict(sorted(out.items()))


# ============================================================================ formatting
def mean_std(vals) -> tuple[float, float]:
    vals = list(vals)
    return float(np.mean(vals)), (float(statistics.stdev(vals)) if len(vals) > 1 else float("nan"))


def pct_cell(vals: dict[int, float]) -> tuple[str, str]:
    """('mean ± std' in %, 'seed: value, ...')."""
    m, s = mean_std(100 * v for v in vals.values())
    return f"{m:.2f} ± {s:.2f}", ", ".join(f"{k}: {100 * v:.2f}" for k, v in vals.items())


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[str, str, str]:
    """Per-seed differences a - b in points: ('+x, +y, ...', 'mean ± std', 'wins/n')."""
    seeds = sorted(set(a) & set(b))
    d = [100 * (a[s] - b[s]) for s in seeds]
    m, s = mean_std(d) if d else (float("nan"), float("nan"))
    return ", ".join(f"{x:+.2f}" for x in d), f"{m:+.2f} ± {s:.2f}", f"{sum(x > 0 for x in d)}/{len(d)}"


def md_table(headers, rows) -> list[str]:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def run_lines(sweep: Sweep) -> list[str]:
    """The report's "Run" section: the commands that filled the sweep, its total time, the machine."""
    commands = [v["command"] for v in sweep.meta.get("invocations", {}).values() if v.get("command")]
    commands = list(dict.fromkeys(commands)) or [sweep.meta.get("command", "")]
    # summed over the invocations kept in the file (a report-only run has not saved totals of its own)
    invocations = sweep.meta.get("invocations", {}).values()
    total_cpu, total_wall = sum(v["cpu_s"] for v in invocations), sum(v["wall_s"] for v in invocations)
    return ["", "## Run", "",
            f"Commands (processes that filled this sweep, some side by side on the 2 cores): "
            f"{'; '.join(f'`{c}`' for c in commands)}. Whole benchmark: {total_cpu / 60:.1f} min CPU, "
            f"{total_wall / 60:.1f} min wall, summed over the processes.", "", *env_lines(sweep), ""]


def env_lines(sweep: Sweep) -> list[str]:
    e = sweep.meta["environment"]
    load = e.get("loadavg_at_start")
    load_s = " / ".join(f"{v:.1f}" for v in load) if load else "n/a"
    return [f"Environment: CPU only, {e['nproc']} cores shared with other jobs (load average at start {load_s}), "
            f"`torch.set_num_threads({e['torch_threads']})`, python {e['python']}, torch {e['torch']}, timm "
            f"{e['timm']}, transformers {e['transformers']}; git {sweep.meta['git']['commit'][:10]} "
            f"(uncommitted library files: {', '.join(sweep.meta['git']['dirty_library_files']) or 'none'}). "
            "CPU seconds are `time.process_time()` of the benchmark process (all its threads); wall seconds "
            "depend on the other jobs and are indicative only."]
