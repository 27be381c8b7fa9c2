"""Compatibility sweep: every method on every timm family and every transformers image classifier.

Rows: one model per timm model module (``timm.list_modules()``: its smallest registered variant by
parameter count, built at a smaller ``img_size`` where the model takes one) and one per class in
transformers' ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`` that builds from a shrunk (else its
default) config. Columns (cells)::

    s_kd        the row model as student, kd from a small timm teacher
    s_fitnets   student, fitnets hint_layers=auto (hint_weight 1)
    s_byot      student, byot with automatic exits
    s_feature   student backbone, label-free feature distillation (k-NN evaluation)
    t_kd        the row model as teacher of a small timm student, kd
    t_fitnets   teacher, fitnets auto
    sftn        the row model as SFTN teacher for a small timm student
    byot_export byot with byot_export_exits: exits reload with MultiExitModel, early exit runs

A student cell passes when 2 steps train, evaluate() reports accuracy (k-NN for features),
save_model() writes and the model reloads with its own library (timm ``local-dir:``,
transformers ``AutoModelForImageClassification`` / ``AutoModel``) to identical outputs. A cell
refused at construction (a one-line ValueError from the trainer) is counted apart from failures.

    python benchmarks/compat_sweep.py --part 0/2 &  python benchmarks/compat_sweep.py --part 1/2
    python benchmarks/compat_sweep.py --families resnet,vit --columns s_kd,s_byot --limit 5
    python benchmarks/compat_sweep.py --report          # docs/compatibility.md from the results

Each row runs in its own process (a crash or a timeout costs one row); results append to
benchmarks/results/compat/part-*.jsonl, one line per cell, so parts run in parallel and an
interrupted sweep resumes (``--redo`` runs cells again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "compat"
ROWS_FILE = RESULTS / "rows.json"
DOC = ROOT / "docs" / "compatibility.md"
COLUMNS = ["s_kd", "s_fitnets", "s_byot", "s_feature", "t_kd", "t_fitnets", "sftn", "byot_export"]
SMALL = 64  # the input size of every cell where the model takes it
REF = "test_resnet"  # the small timm partner (teacher of student cells, student of teacher cells)


# ----------------------------------------------------------------------------------------- rows
def timm_rows() -> list[dict]:
    import timm
    import torch

    rows = []
    for module in sorted(timm.list_modules()):
        names = [n for n in timm.list_models(module=module) if not n.startswith("test_")] or \
            timm.list_models(module=module)
        best = None
        for name in names:
            try:
                with torch.device("meta"):
                    m = timm.create_model(name, pretrained=False, num_classes=10)
                n = sum(p.numel() for p in m.parameters())
            except Exception:  # noqa: BLE001 - a variant that does not build is skipped
                continue
            if best is None or n < best[1]:
                best = (name, n)
        if best is not None:
            rows.append({"id": f"timm/{module}", "library": "timm", "family": module, "model": best[0],
                         "params": best[1]})
    return rows


_SHRINK = {  # attribute -> small value (lists are shrunk element-wise below)
    "num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "embed_dim": 16, "projection_dim": 16, "num_channels": 3, "mlp_ratio": 2.0,
}


def _shrink_dict(d: dict) -> dict:
    d = dict(d)
    for key, value in _SHRINK.items():
        if isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool):
            d[key] = value
    for key in ("depths", "num_layers_per_stage", "layer_depths", "depth"):
        v = d.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            d[key] = [1] * len(v)
    for key in ("hidden_sizes", "embed_dims", "neck_hidden_sizes", "hidden_dims"):
        v = d.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            d[key] = [max(8, min(x, 16 * (i + 1))) for i, x in enumerate(v)]
    for key in ("num_heads", "num_attention_heads"):
        v = d.get(key)
        if isinstance(v, (list, tuple)) and v:
            d[key] = [1] * len(v)
    p = d.get("patch_size")
    if isinstance(d.get("image_size"), int) and isinstance(p, int) and d["image_size"] > max(SMALL, 4 * p):
        d["image_size"] = max(SMALL, 4 * p)  # a fixed-size model: fewer tokens
    for key in ("out_features", "out_indices", "stage_names"):  # derived from the depths: let the config redo them
        d.pop(key, None)
    for key in ("vision_config", "backbone_config", "text_config"):
        if isinstance(d.get(key), dict):
            d[key] = _shrink_dict(d[key])
    return d


def _shrunk(config):
    return type(config)(**_shrink_dict(config.to_dict()))


def transformers_rows() -> list[dict]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    rows = []
    for model_type, class_names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items():
        for cls_name in class_names if isinstance(class_names, (list, tuple)) else [class_names]:
            rows.append({"id": f"transformers/{cls_name}", "library": "transformers", "family": model_type,
                         "model": cls_name})
    return rows


def build_transformers(row):
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = getattr(transformers, row["model"])
    base = CONFIG_MAPPING[row["family"]]()
    base.num_labels = 10
    errors = []
    from hf_distill.models import forward_images, input_spec

    def shrunk():
        return _shrunk(base)

    for make, what in ((shrunk, "shrunk"), (lambda: base, "default")):
        for small in (True, False):
            try:
                config = make()
                torch.manual_seed(0)
                model = cls(config)
                model.eval()
                spec = input_spec(model)
                side = SMALL if small else spec.image_size[0]
                with torch.no_grad():
                    forward_images(model, torch.randn(2, spec.in_chans, side, side))  # SigLIP 2 takes patches
                return model, f"{what} config, {side}px", (side, side)
            except Exception as err:  # noqa: BLE001
                errors.append(f"{what}/{'small' if small else 'own size'}: {_line(err)}")
    raise RuntimeError("does not build: " + "; ".join(errors))


def build_timm(row):
    """The model, how it was built, and the input size its cells use (checked by a forward at that size)."""
    import timm
    import torch

    from hf_distill.models import input_spec

    name = row["model"]
    last = None
    for kw, small in (({"img_size": SMALL}, True), ({}, True), ({}, False)):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
            spec = input_spec(model)
            size = tuple(spec.image_size) if spec.fixed_size or not small else (SMALL, SMALL)
            with torch.no_grad():
                model.eval()(torch.randn(2, spec.in_chans, *size))
            return model, (f"img_size={SMALL}" if kw else f"{size[0]}px"), size
        except Exception as err:  # noqa: BLE001
            last = err
    raise RuntimeError(f"does not build: {_line(last)}")


# ----------------------------------------------------------------------------------------- cells
def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


class _Images:
    """Random images and labels at ``size`` (a torch dataset of dicts, as the trainer collates)."""

    def __init__(self, n, size, chans=3, labels=True, seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, chans, *size, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)
        self.labels = labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = {"pixel_values": self.x[i]}
        if self.labels:
            item["labels"] = int(self.y[i])
        return item


def _args(out, **kw):
    from hf_distill import DistillationTrainingArguments

    base = dict(output_dir=out, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3,
                max_steps=2, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return DistillationTrainingArguments(**base)


def _ref(size):
    import timm

    from hf_distill.models import InputSpec, set_input_spec

    m = timm.create_model(REF, pretrained=False, num_classes=10)
    set_input_spec(m, InputSpec(image_size=tuple(size)))
    return m


def _reload_same(model, out, backbone=False):
    """Reload ``out`` with the model's own library; raise unless the outputs are identical."""
    import timm
    import torch

    from hf_distill.models.features import backbone_features
    from hf_distill.models import call_model, input_spec, is_transformers_model

    spec = input_spec(model)
    x = torch.randn(2, spec.in_chans, *spec.image_size, generator=torch.Generator().manual_seed(1))
    if is_transformers_model(model):
        import transformers

        auto = transformers.AutoModel if backbone else transformers.AutoModelForImageClassification
        config = transformers.AutoConfig.from_pretrained(out)
        if type(config) not in auto._model_mapping:  # a type the Auto class does not map: the class the config names
            auto = getattr(transformers, config.architectures[0])
        back = auto.from_pretrained(out)
    else:
        back = timm.create_model(f"local-dir:{out}", pretrained=True)
    model.eval(), back.eval()
    with torch.no_grad():
        if backbone:
            a, b = backbone_features(model, x)[0], backbone_features(back, x)[0]
        else:
            a, b = call_model(model, x), call_model(back, x)
    if a.shape != b.shape or not torch.equal(a, b):
        diff = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} {tuple(b.shape)}"
        raise AssertionError(f"reloaded outputs differ ({diff})")


def run_cell(column, build, out):
    """``("pass" | "refused" | "fail", reason)`` for one cell."""
    import torch

    from hf_distill import DistillationTrainer
    from hf_distill.models import input_spec

    from dataclasses import replace

    from hf_distill.models import set_input_spec

    model, _, size = build()
    spec = input_spec(model)
    if tuple(spec.image_size) != tuple(size):
        set_input_spec(model, replace(spec, image_size=tuple(size)))
        spec = input_spec(model)
    train, ev = _Images(8, size, spec.in_chans), _Images(4, size, spec.in_chans, seed=1)
    kw, student, teacher, trainer_kw = {}, model, None, {}
    if column == "s_kd":
        kw, teacher = dict(distill_method="kd"), _ref(size)
    elif column == "s_fitnets":
        kw, teacher = dict(distill_method="fitnets", hint_layers=["auto"], hint_weight=1.0), _ref(size)
    elif column == "s_byot":
        kw = dict(distill_method="byot")
    elif column == "byot_export":
        kw = dict(distill_method="byot", byot_export_exits=True)
    elif column == "s_feature":
        kw, teacher = dict(distill_method="feature"), _ref(size)
        train = _Images(8, size, spec.in_chans, labels=False)
        trainer_kw = {"knn_train_dataset": _Images(8, size, spec.in_chans, seed=2)}
    elif column in ("t_kd", "t_fitnets"):
        student, teacher = _ref(size), model
        kw = dict(distill_method="kd") if column == "t_kd" else dict(distill_method="fitnets", hint_layers=["auto"],
                                                                    hint_weight=1.0)
    elif column == "sftn":
        kw = dict(distill_method="sftn", sftn_student_model=REF)
    try:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(out, **kw),
                                      train_dataset=train, eval_dataset=ev, **trainer_kw)
    except (ValueError, TypeError, NotImplementedError) as err:
        return "refused", _line(err)
    trainer.train()
    metrics = trainer.evaluate()
    acc = [k for k in metrics if k.endswith("accuracy")]
    if not acc:
        raise AssertionError(f"evaluate() reported no accuracy: {sorted(metrics)}")
    trainer.save_model(out)
    if not any(Path(out).iterdir()):
        raise AssertionError("save_model wrote nothing")
    if column == "byot_export":
        from hf_distill.models.exits import MultiExitModel

        multi = MultiExitModel.from_pretrained(out)
        x = torch.randn(3, spec.in_chans, *size, generator=torch.Generator().manual_seed(3))
        logits, used = multi(x, early_exit_threshold=0.0)  # every sample leaves at the first exit
        if logits.shape != (3, 10) or used.tolist() != [0, 0, 0]:
            raise AssertionError(f"early exit gave {tuple(logits.shape)} / exits {used.tolist()}")
        multi(x, early_exit_threshold=1.1)  # none leaves early
    elif column in ("t_kd", "t_fitnets"):
        _reload_same(trainer.student, out)
    else:
        _reload_same(trainer.student, out, backbone=column == "s_feature")
    return "pass", ""


def run_row(row, columns, results_file):
    import torch

    torch.set_num_threads(1)
    build = (lambda: build_timm(row)) if row["library"] == "timm" else (lambda: build_transformers(row))
    try:
        _, how, _ = build()
    except Exception as err:  # noqa: BLE001
        _write(results_file, row, "build", "unbuildable", _line(err), 0.0)
        return
    _write(results_file, row, "build", "pass", how, 0.0)
    for column in columns:
        start = time.time()
        with tempfile.TemporaryDirectory() as out:
            try:
                status, reason = run_cell(column, build, out)
            except Exception as err:  # noqa: BLE001
                status, reason = "fail", _line(err)
                if os.environ.get("COMPAT_TRACE"):
                    traceback.print_exc()
        _write(results_file, row, column, status, reason, time.time() - start)


def _write(path, row, column, status, reason, seconds):
    with open(path, "a") as f:
        f.write(json.dumps({"id": row["id"], "library": row["library"], "model": row["model"], "column": column,
                            "status": status, "reason": reason, "seconds": round(seconds, 1)}) + "\n")
    print(f"{row['id']:45s} {column:12s} {status:10s} {reason[:120]}", flush=True)


# ----------------------------------------------------------------------------------------- driver
def load_results() -> dict:
    done = {}
    for path in sorted(RESULTS.glob("part-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["id"], r["column"])] = r  # the last run of a cell wins
    return done


def all_rows(refresh=False) -> list[dict]:
    if ROWS_FILE.exists() and not refresh:
        return json.loads(ROWS_FILE.read_text())
    rows = timm_rows() + transformers_rows()
    RESULTS.mkdir(parents=True, exist_ok=True)
    ROWS_FILE.write_text(json.dumps(rows, indent=1))
    return rows


def _status(cell: dict) -> str:
    # rows that ran out of time on the shared CPU (older results wrote them as failures)
    return "timeout" if cell["status"] == "timeout" or cell["reason"].startswith("timeout") else cell["status"]


def report() -> str:
    import timm
    import torch
    import transformers

    rows = all_rows()
    done = load_results()
    lines = ["# Compatibility", "",
             "Generated by `benchmarks/compat_sweep.py --report` from the cells it ran (one process per row, "
             "CPU, 1 thread). A student cell passes when 2 training steps run, `evaluate()` reports accuracy, "
             "`save_model()` writes and the model reloads with its own library to identical outputs; teacher "
             "cells train a small timm student (`test_resnet`); `sftn` trains the row model as teacher for it; "
             "`byot_export` reloads the exits with `MultiExitModel.from_pretrained` and runs early exit. "
             "*refused*: a one-line error at construction; *fail*: anything else.", "",
             f"Library versions: torch {torch.__version__}, timm {timm.__version__}, transformers "
             f"{transformers.__version__}.", ""]
    covered = {i for (i, c) in done if c == "build"}
    lines.append(f"Coverage: {len(covered)} of {len(rows)} rows run "
                 f"({sum(r['library'] == 'timm' for r in rows)} timm families, "
                 f"{sum(r['library'] == 'transformers' for r in rows)} transformers classes).")
    lines.append("")
    lines += ["## Pass rates (of the buildable rows run)", "",
              "| library | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for lib in ("timm", "transformers"):
        ids = [r["id"] for r in rows if r["library"] == lib and done.get((r["id"], "build"), {}).get("status") ==
               "pass"]
        cells = []
        for c in COLUMNS:
            rs = [done[(i, c)] for i in ids if (i, c) in done]
            timeouts = sum(_status(r) == "timeout" for r in rs)
            rs = [r for r in rs if _status(r) != "timeout"]
            ok = sum(r["status"] == "pass" for r in rs)
            ref = sum(r["status"] == "refused" for r in rs)
            cells.append((f"{ok}/{len(rs)} ({100 * ok / len(rs):.0f}%), {ref} R" if rs else "-")
                         + (f", {timeouts} T" if timeouts else ""))
        lines.append(f"| {lib} | " + " | ".join(cells) + " |")
    all_cells = [done[(r["id"], c)] for r in rows for c in COLUMNS if (r["id"], c) in done
                 and done.get((r["id"], "build"), {}).get("status") == "pass" and _status(done[(r["id"], c)]) != "timeout"]
    if all_cells:
        ok = sum(c["status"] == "pass" for c in all_cells)
        ref = sum(c["status"] == "refused" for c in all_cells)
        lines += ["", f"All columns: {ok}/{len(all_cells)} cells pass ({100 * ok / len(all_cells):.1f}%); "
                  f"{ok + ref}/{len(all_cells)} pass or are refused at construction with one line "
                  f"({100 * (ok + ref) / len(all_cells):.1f}%)."]
    unbuildable = [r for r in rows if done.get((r["id"], "build"), {}).get("status") == "unbuildable"]
    lines += ["", "P pass, R refused at construction (one line, counted in the denominators), F fail, T the row ran "
              "out of time (per-row limit, 2 CPU cores shared by several jobs; not counted), - not run.",
              "", "## Cells", "",
              "| row | model | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    reasons = []
    for r in rows:
        b = done.get((r["id"], "build"))
        if b is None or b["status"] != "pass":
            continue
        marks = []
        for c in COLUMNS:
            cell = done.get((r["id"], c))
            marks.append("-" if cell is None else {"pass": "P", "refused": "R", "fail": "F", "timeout": "T"}[
                _status(cell)])
            if cell is not None and cell["status"] != "pass":
                reasons.append(f"* `{r['id']}` {c} ({_status(cell)}): {cell['reason']}")
        lines.append(f"| {r['id']} | {r['model']} ({b['reason']}) | " + " | ".join(marks) + " |")
    lines += ["", "## Reasons (refused and failed cells)", ""] + (reasons or ["none"])
    if unbuildable:
        lines += ["", "## Rows that do not build here", ""]
        lines += [f"* `{r['id']}` ({r['model']}): {done[(r['id'], 'build')]['reason']}" for r in unbuildable]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="", help="comma-separated substrings of row ids (e.g. resnet,vit)")
    p.add_argument("--columns", default=",".join(COLUMNS), help="comma-separated columns")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows")
    p.add_argument("--library", choices=["timm", "transformers"], default=None)
    p.add_argument("--part", default="0/1", help="i/n: run every n-th row starting at i (parallel parts)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument("--redo", action="store_true", help="run cells that have a result again")
    p.add_argument("--report", action="store_true", help="write docs/compatibility.md and exit")
    p.add_argument("--refresh-rows", action="store_true", help="list the rows again")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row (JSON) in this process
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    columns = [c for c in a.columns.split(",") if c]
    bad = [c for c in columns if c not in COLUMNS]
    if bad:
        p.error(f"unknown columns {bad}; choose from {COLUMNS}")
    if a.row:
        run_row(json.loads(a.row), columns, a.out)
        return 0
    if a.report:
        DOC.write_text(report())
        print(f"wrote {DOC}")
        return 0
    rows = all_rows(a.refresh_rows)
    if a.library:
        rows = [r for r in rows if r["library"] == a.library]
    if a.families:
        keys = [k.strip() for k in a.families.split(",") if k.strip()]
        rows = [r for r in rows if any(k in r["id"] or k == r["model"] for k in keys)]
    i, n = (int(v) for v in a.part.split("/"))
    rows = rows[i::n]
    if a.limit:
        rows = rows[: a.limit]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"part-{i}-of-{n}.jsonl"
    done = load_results()
    for row in rows:
        todo = [c for c in columns if a.redo or (row["id"], c) not in done]
        if (row["id"], "build") in done and done[(row["id"], "build")]["status"] == "unbuildable" and not a.redo:
            continue
        if not todo:
            continue
        cmd = [sys.executable, __file__, "--row", json.dumps(row), "--columns", ",".join(todo), "--out", str(out)]
        log = open(RESULTS / f"part-{i}-of-{n}.log", "a")  # the trainers' own logs
        try:
            subprocess.run(cmd, timeout=a.timeout, check=False, stdout=log, stderr=subprocess.STDOUT)
        except subprocess.TimeoutExpired:  # the cell that was running when the row ran out of time
            now = load_results()
            left = [c for c in todo if (row["id"], c) not in now or now[(row["id"], c)] is done.get((row["id"], c))]
            _write(out, row, left[0] if left else todo[-1], "timeout", f"the row ran past {a.timeout}s", a.timeout)
        finally:
            log.close()
        print(" ".join(f"{c}={r['status']}" for (rid, c), r in load_results().items() if rid == row["id"]),
              row["id"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
