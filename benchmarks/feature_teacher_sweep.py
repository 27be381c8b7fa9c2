"""Feature-distillation and teacher sweep: does every backbone work as a feature student, a feature teacher
and a KD teacher?

Rows: the smallest model of every timm module that registers models (shortlisted by size words in the
names, then the fewest parameters, counted on the meta device), and every class of transformers'
``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`` built from its default config with at most 2 layers per
stage (the user path: a folder holding ``config.json``, loaded with ``hf_distill.load_model``).

Cells (2 training steps each, random images, a tiny timm ResNet on the other side):

* ``feat_student``: the model as the feature student (a backbone, no labels) at ``--size`` px where it
  accepts it (``load_model(..., image_size=)``; where that keyword does not exist, the student is built
  at its default size and told the size afterwards, as the CLI did), ``save_model()``, reload with
  ``load_model(OUT, backbone=True)``, identical features;
* ``feat_teacher``: the model (default size) as the feature teacher;
* ``kd_teacher``: the model (default size, 10 classes) as the KD teacher, then ``evaluate()``.

A cell is ``pass``, ``refused`` (a one-line ``ValueError`` / ``ModelLoadError`` at construction, before any
step) or ``fail`` (anything else, or an error once training ran). Results go to
``benchmarks/results/feature_teacher_sweep_<tag>.jsonl``; a summary is printed.

    nice -n 19 python benchmarks/feature_teacher_sweep.py --tag after            # everything
    python benchmarks/feature_teacher_sweep.py --rows levit,deit --cells feat_student
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CELLS = ("feat_student", "feat_teacher", "kd_teacher")
SIZE_WORDS = ("atto", "zepto", "femto", "pico", "nano", "xxxs", "xxs", "mini", "micro", "xs", "tiny", "t8", "s0",
              "b0", "a0", "small", "lite", "light", "n", "t", "s", "18", "10", "26")
_CACHE = os.path.join(RESULTS, "feature_teacher_sweep_timm_rows.json")


# ------------------------------------------------------------------------------------------------ rows


def _size_rank(name: str) -> int:
    parts = re.split(r"[_.\-]", name.lower())
    for rank, word in enumerate(SIZE_WORDS):
        if word in parts or (len(word) > 2 and word in name.lower()):
            return rank
    return len(SIZE_WORDS)


def timm_rows() -> list[tuple[str, str]]:
    """``(module, smallest model)`` for every timm module (cached in results/, keyed by timm's version)."""
    import timm

    if os.path.exists(_CACHE):
        with open(_CACHE) as f:
            cached = json.load(f)
        if cached.get("timm") == timm.__version__:
            return [tuple(r) for r in cached["rows"]]
    rows = []
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if not n.startswith("test_")]
        if not names:
            continue
        shortlist = sorted(names, key=lambda n: (_size_rank(n), len(n), n))[:6]
        best = None
        for name in shortlist:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # noqa: BLE001 - some variants do not build; another one will
                continue
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            rows.append((module, best[1]))
    os.makedirs(RESULTS, exist_ok=True)
    with open(_CACHE, "w") as f:
        json.dump({"timm": timm.__version__, "rows": rows}, f, indent=1)
    return rows


def _shrink(config) -> None:
    """At most 2 layers per stage (and in sub-configs), so the default widths stay but CPUs keep up."""
    for key, value in list(vars(config).items()):
        if key in ("num_hidden_layers", "num_layers", "n_layer", "num_self_attends_per_block") and isinstance(value, int):
            setattr(config, key, min(value, 2))
        elif key in ("depths", "depth") and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            setattr(config, key, [min(v, 1) for v in value])
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _shrink(value)


def transformers_rows() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as MAPPING

    rows = []
    for model_type, classes in MAPPING.items():
        for cls in (classes if isinstance(classes, tuple) else (classes,)):
            rows.append((model_type, cls))
    return rows


def transformers_folder(model_type: str, cls_name: str, root: str) -> str:
    """A folder with the (shrunk) default config of ``cls_name``: what a user loads by path."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    if getattr(config, "out_features", None) is not None:  # backbone stages of the full depth: recomputed
        fields = {k: v for k, v in config.to_dict().items() if k not in ("stage_names", "out_features", "out_indices", "model_type")}
        config = AutoConfig.for_model(model_type, **fields)
    config.architectures = [cls_name]
    folder = os.path.join(root, cls_name)
    try:
        with torch.device("meta"):
            getattr(transformers, cls_name)(config)
    except Exception:  # noqa: BLE001 - shrinking broke it: the default config, or unbuildable if that fails too
        config = AutoConfig.for_model(model_type)
        config.architectures = [cls_name]
        with torch.device("meta"):
            getattr(transformers, cls_name)(config)
    config.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ cells


class _Timeout(BaseException):  # not an Exception: the probes of the library must not swallow it
    pass


def _alarm(signum, frame):
    raise _Timeout("timed out")


def _data(size: int, n: int = 8, labels: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    return [{"pixel_values": x[i], **({"labels": i % 10} if labels else {})} for i in range(n)]


def _args(out: str, method: str):
    from hf_distill import DistillationTrainingArguments

    return DistillationTrainingArguments(
        output_dir=out, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2, learning_rate=1e-3,
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, distill_method=method, logging_steps=1)


def _small_student(size: int, backbone: bool):
    from hf_distill import InputSpec, load_model, set_input_spec

    torch.manual_seed(0)
    model = load_model("resnet10t", num_labels=None if backbone else 10, pretrained=False, backbone=backbone)
    set_input_spec(model, InputSpec(image_size=(size, size)))
    return model


def _load(name: str, size: int | None = None, **kw):
    """``load_model`` at ``size`` px: with its ``image_size`` keyword where it has one (the fix), else at the
    default size and told the size afterwards (what the CLI did before)."""
    import dataclasses

    from hf_distill import load_model
    from hf_distill.models import input_spec, set_input_spec

    if size is not None and "image_size" in inspect.signature(load_model).parameters:
        return load_model(name, pretrained=False, image_size=size, **kw)
    model = load_model(name, pretrained=False, **kw)
    if size is not None:
        set_input_spec(model, dataclasses.replace(input_spec(model), image_size=(size, size)))
    return model


def cell_feat_student(name: str, size: int, out: str) -> str:
    from hf_distill import DistillationTrainer, load_model
    from hf_distill.models.features import backbone_features
    from hf_distill.models import input_spec

    torch.manual_seed(0)
    student = _load(name, size, backbone=True)
    spec = input_spec(student)
    trainer = DistillationTrainer(model=student, teacher_model=_small_student(spec.image_size[0], True),
                                  args=_args(out, "feature"), train_dataset=_data(spec.image_size[0], labels=False))
    _constructed()
    trainer.train()
    trainer.save_model(out)
    reloaded = load_model(out, backbone=True).eval()
    x = torch.randn(2, spec.in_chans, *spec.image_size)
    with torch.no_grad():
        want, got = backbone_features(trainer.student.eval(), x), backbone_features(reloaded, x)
    if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got)):
        raise AssertionError("reloaded backbone gives other features")
    return f"{spec.image_size[0]}x{spec.image_size[1]} spatial {tuple(want[1].shape[1:])}"


def cell_feat_teacher(name: str, size: int, out: str) -> str:
    from hf_distill import DistillationTrainer

    teacher = _load(name, backbone=True)
    trainer = DistillationTrainer(model=_small_student(size, True), teacher_model=teacher,
                                  args=_args(out, "feature"), train_dataset=_data(size, labels=False))
    _constructed()
    trainer.train()
    return trainer.teachers.adapters[0].describe()[:80]


def cell_kd_teacher(name: str, size: int, out: str) -> str:
    from hf_distill import DistillationTrainer

    teacher = _load(name, num_labels=10)
    trainer = DistillationTrainer(model=_small_student(size, False), teacher_model=teacher, args=_args(out, "kd"),
                                  train_dataset=_data(size), eval_dataset=_data(size))
    _constructed()
    trainer.train()
    metrics = trainer.evaluate()
    return f"eval_loss {metrics['eval_loss']:.3f}"


_STATE = {"constructed": False}


def _constructed():
    _STATE["constructed"] = True


def run_cell(cell: str, name: str, size: int, timeout: int) -> dict:
    fn = {"feat_student": cell_feat_student, "feat_teacher": cell_feat_teacher, "kd_teacher": cell_kd_teacher}[cell]
    _STATE["constructed"] = False
    start = time.time()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(), \
                contextlib.redirect_stdout(open(os.devnull, "w")):  # the Trainer's log lines
            warnings.simplefilter("ignore")
            detail = fn(name, size, out)
        status, why = "pass", detail
    except (Exception, _Timeout) as err:  # noqa: BLE001 - the sweep records every failure
        from hf_distill.models import ModelLoadError

        message = f"{type(err).__name__}: {err}".replace("\n", " ")
        one_line = "\n" not in str(err).strip() and len(str(err)) < 400
        refused = isinstance(err, (ValueError, ModelLoadError)) and not _STATE["constructed"] and one_line
        status, why = ("refused" if refused else "fail"), message[:300]
        if status == "fail" and os.environ.get("SWEEP_TRACEBACK"):
            traceback.print_exc()
    finally:
        signal.alarm(0)
    return {"cell": cell, "status": status, "why": why, "seconds": round(time.time() - start, 1)}


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="run")
    parser.add_argument("--size", type=int, default=64, help="the student's input size (64)")
    parser.add_argument("--library", choices=("timm", "transformers", "both"), default="both")
    parser.add_argument("--rows", default="", help="comma-separated substrings of the rows to run")
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (120)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cells = [c for c in args.cells.split(",") if c]
    wanted = [r for r in args.rows.split(",") if r]
    rows = []
    if args.library in ("timm", "both"):
        rows += [("timm", module, name, name) for module, name in timm_rows()]
    if args.library in ("transformers", "both"):
        rows += [("transformers", t, cls, cls) for t, cls in transformers_rows()]
    if wanted:
        rows = [r for r in rows if any(w in r[1] or w in r[2] for w in wanted)]
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"feature_teacher_sweep_{args.tag}.jsonl")
    root = tempfile.mkdtemp()
    with open(path, "a" if wanted else "w") as log:
        for library, family, label, name in rows:
            if library == "transformers":
                try:
                    name = transformers_folder(family, label, root)
                except Exception as err:  # noqa: BLE001
                    record = {"library": library, "family": family, "model": label, "cell": "build",
                              "status": "unbuildable", "why": f"{type(err).__name__}: {err}"[:200]}
                    print(json.dumps(record), flush=True)
                    log.write(json.dumps(record) + "\n")
                    continue
            for cell in cells:
                record = {"library": library, "family": family, "model": label,
                          **run_cell(cell, name, args.size, args.timeout)}
                print(json.dumps(record), flush=True)
                log.write(json.dumps(record) + "\n")
                log.flush()
    summarize(path)
    return 0


def summarize(path: str) -> None:
    records = [json.loads(line) for line in open(path)]
    latest = {}
    for r in records:  # a rerun of some rows replaces their earlier records
        latest[(r["library"], r["model"], r["cell"])] = r
    print(f"\n{path}")
    for library in ("timm", "transformers"):
        for cell in CELLS:
            rs = [r for r in latest.values() if r["library"] == library and r["cell"] == cell]
            if rs:
                count = {s: sum(r["status"] == s for r in rs) for s in ("pass", "refused", "fail")}
                print(f"{library:12s} {cell:13s} pass {count['pass']}/{len(rs)}  refused {count['refused']}  "
                      f"fail {count['fail']}")
    for r in latest.values():
        if r["status"] in ("fail", "refused"):
            print(f"  {r['status']:7s} {r['library']:12s} {r['model']:40s} {r['cell']:13s} {r['why'][:150]}")


def _latest(paths):
    latest, order = {}, 0
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            order += 1
            latest[(r["library"], r["model"], r["cell"])] = {**r, "order": order}
    # a row that was unbuildable and then built (a rerun) keeps only its cells
    for (lib, model, cell), r in list(latest.items()):
        if cell == "build" and any(k[:2] == (lib, model) and k[2] != "build" and v["order"] > r["order"]
                                   for k, v in latest.items()):
            del latest[(lib, model, cell)]
    return latest


def compare(before: str, after: list[str]) -> None:
    """Pass / refused / fail counts before and after, on the rows that build (by the after run's check)."""
    old, new = _latest([before]), _latest(after)
    unbuildable = {(lib, model) for (lib, model, cell), r in new.items() if r["status"] == "unbuildable"}
    print("| library | cell | before: pass / refused / fail | after: pass / refused / fail |\n|---|---|---|---|")
    for library in ("timm", "transformers"):
        for cell in CELLS:
            counts = []
            for records in (old, new):
                rs = [r for (lib, model, c), r in records.items()
                      if lib == library and c == cell and (lib, model) not in unbuildable]
                counts.append(" / ".join(str(sum(r["status"] == s for r in rs)) for s in ("pass", "refused", "fail"))
                              + f" of {len(rs)}")
            print(f"| {library} | {cell} | {counts[0]} | {counts[1]} |")
    print(f"unbuildable (left out): {sorted(m for _, m in unbuildable)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--summary":
        summarize(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--compare":  # --compare BEFORE AFTER [AFTER ...]
        compare(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
