"""Journeys: the `hf-distill` command as a user types it, in a subprocess, on local data.

The README's demo, every `examples/*.yaml` config (the README's own blocks: tests/test_readme.py), a real
`imagefolder` tree with a corrupt file, a resumed run and bad input - each checked for what a user sees (exit code, one-line errors, no
progress-bar noise in logs) and what ends up on disk (a trained, reloadable student with its card;
nothing lost on failure). Runs shortened with flags (`--max_steps`, `--max_*_samples`), as a user
would for a smoke test; everything else is the command as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CLI = shutil.which("hf-distill", path=os.path.dirname(sys.executable)) or shutil.which("hf-distill")
SHORT_TRAIN = ["--max_steps", "3", "--max_train_samples", "128", "--max_eval_samples", "48"]
NOISE = ("\r", "\x1b[", "Generating train split", "Writing model shards", "Traceback")


def run(args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HF_DISTILL_TRACEBACK", None)
    return subprocess.run([CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, f"{noise!r} in the output"
    return proc


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logged(stdout: str) -> list[dict]:
    """The Trainer's log lines (one dict per line when the output is not a terminal)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("{'") and line.endswith("}"):
            out.append(eval(line, {}))  # the Trainer prints python dicts of strings and numbers
    return out


def assert_trained(folder: Path, steps: int, terms: set[str], stdout: str) -> None:
    from hf_distill import load_model

    card = (folder / "README.md").read_text()
    assert re.search(rf"\| steps \| {steps} \|", card), "the card does not report the steps trained"
    assert not re.search(r"\| epochs \| 0 \|", card)
    train_logs = [h for h in logged(stdout) if "loss" in h or "train_loss" in h]
    assert train_logs and terms <= set().union(*train_logs), f"loss terms {terms} not logged"
    metrics = json.loads(stdout[stdout.index("{\n"):stdout.index("\n}") + 2])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    load_model(str(folder))  # the saved student reloads in its own library


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's working directory after the README's first command (the demo, shortened)."""
    assert CLI, "hf-distill is not installed next to this Python"
    ws = tmp_path_factory.mktemp("user")
    shutil.copytree(EXAMPLES, ws / "examples")
    proc = ok(run(["demo", "--teacher_epochs", "2", "--student_epochs", "2", "--student_fraction", "0.05"], ws))
    assert "epoch 1/2" in proc.stdout and "student distilled (KD)" in proc.stdout
    assert (ws / "hf_distill_demo" / "teacher" / "model.safetensors").exists()
    return ws


def test_help_lists_the_commands_and_the_distillation_flags_first(ws):
    top = ok(run(["--help"], ws)).stdout
    for command in ("train", "cache-teacher", "search", "layers", "demo"):
        assert re.search(rf"^  {command}\s", top, re.M), command
    train = ok(run(["train", "--help"], ws)).stdout
    order = [train.index(g) for g in ("distillation:", "method options:", "model:", "data:",
                                      "training (transformers.TrainingArguments):")]
    assert order == sorted(order)
    assert train.index("--hint_layers") < train.index("--learning_rate")
    assert len(train.split("distillation:")[0].splitlines()) < 10  # a short usage line, not 500 flags


@pytest.mark.parametrize("config", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_config_trains(ws, config):
    method = config.split("_digits")[0]
    out = f"outputs/journey_{method}"
    proc = ok(run(["--config", f"examples/{config}", *SHORT_TRAIN, "--output_dir", out], ws))
    terms = {"kd": {"loss_ce", "loss_kd"}, "fitnets": {"loss_hint"}, "byot": {"loss_ce_exit1", "loss_kd_exit1"},
             "noisy_teacher": {"loss_mse"}, "sftn": {"loss_ce_teacher", "loss_kl_branch1"}}[method]
    if method == "sftn":  # two phases: the teacher, then the student distilled from it
        first = proc.stdout[:proc.stdout.index("SFTN phase 2")]
        assert_trained(ws / out, 3, terms, first)
        assert_trained(ws / out / "student", 3, {"loss_kd"}, proc.stdout[len(first):])
    else:
        assert_trained(ws / out, 3, terms, proc.stdout)
    assert "epoch" in proc.stdout or "step" in proc.stdout


@pytest.fixture(scope="module")
def image_folder(ws):
    """An imagefolder tree (one sub-folder per class, sorted on disk) with one truncated PNG."""
    from hf_distill.data import digits_dataset

    train = digits_dataset()["train"]
    root = ws / "my_images"
    for i in range(200):
        example = train[i]
        folder = root / str(example["label"])
        folder.mkdir(parents=True, exist_ok=True)
        example["image"].resize((24, 24)).save(folder / f"img{i:04d}.png")
    good = next((root / "3").iterdir()).read_bytes()
    (root / "3" / "broken.png").write_bytes(good[: len(good) // 2])
    return root


def test_imagefolder_with_a_corrupt_file_trains_and_names_the_file(ws, image_folder):
    out = ws / "outputs" / "folder_run"
    proc = ok(run(["--student_model_name_or_path", "resnet10t", "--no_student_pretrained", "--in_chans", "1",
                   "--image_size", "32", "--dataset_name", "my_images", "--distill_method", "supervised",
                   "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--output_dir", str(out),
                   "--report_to", "none", "--use_cpu"], ws))
    assert "broken.png" in proc.stderr and "skipping an unreadable image" in proc.stderr
    assert "skipped 1 unreadable image" in proc.stdout
    assert re.search(r"^epoch 1/1: step \d+/\d+", proc.stdout, re.M)  # a sign of life per epoch
    assert_trained(out, int(re.search(r"step (\d+)/", proc.stdout).group(1)), {"loss_ce"}, proc.stdout)


def test_resume_from_a_checkpoint_in_the_output_dir(ws):
    args = ["--config", "examples/kd_digits.yaml", "--max_steps", "4", "--save_strategy", "steps", "--save_steps",
            "2", "--max_train_samples", "128", "--max_eval_samples", "48", "--output_dir", "outputs/resumed"]
    ok(run(args, ws))
    assert (ws / "outputs" / "resumed" / "checkpoint-2").exists()
    again = ok(run(args + ["--resume_from_checkpoint", "outputs/resumed/checkpoint-2"], ws))
    assert_trained(ws / "outputs" / "resumed", 4, set(), again.stdout)


TEACHER = "hf_distill_demo/teacher"
BASE = ["--student_model_name_or_path", "resnet10t", "--no_student_pretrained", "--in_chans", "1", "--image_size",
        "32", "--dataset_name", "sklearn-digits", "--teacher_model_name_or_path", TEACHER, "--max_steps", "2",
        "--report_to", "none", "--use_cpu"]
BAD = {
    "abbreviated flag": (["--num_train_epoch", "3"], 2, r"unknown flag --num_train_epoch \(did you mean "
                                                         r"--num_train_epochs\?\)"),
    "misspelt model": (["--student_model_name_or_path", "resnet181"], 1,
                       r"'resnet181' is neither a timm architecture.*Close timm names: resnet18"),
    "wrong image column": (["--image_column_name", "picture"], 2,
                           r"--image_column_name: no column 'picture'.*\['image', 'label'\]"),
    "wrong label column": (["--label_column_name", "target"], 2, r"--label_column_name: no column 'target'"),
    "class mismatch": (["--teacher_model_name_or_path", "resnet18", "--no_teacher_pretrained"], 2,
                       r"predicts 1000 classes but --dataset_name sklearn-digits has 10.*--distill_method supervised"),
    "wrong layer name": (["--distill_method", "fitnets", "--hint_layers", "layer9:layer2"], 1,
                         r"no module named 'layer9'.*closest names.*hf-distill layers MODEL"),
    "method needs an argument": (["--distill_method", "fitnets"], 2, r"--distill_method fitnets needs --hint_layers"),
    "output dir holds a model": (["--output_dir", TEACHER], 2,
                                 r"--output_dir hf_distill_demo/teacher already holds a saved model.*"
                                 r"--overwrite_output_dir"),
    "stream without max_steps": (["--streaming", "--max_steps", "-1"], 2, r"--streaming needs --max_steps"),
    "stream with a cache": (["--streaming", "--teacher_cache_dir", "outputs/no_cache"], 2,
                            r"--streaming cannot read a teacher-output cache"),
    "stream with mixup": (["--streaming", "--mixup_alpha", "0.2"], 2, r"--streaming cannot be mixed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_loses_nothing(ws, case):
    extra, code, message = BAD[case]
    before = digest(ws / TEACHER)
    args = BASE + extra if "--output_dir" in extra else BASE + extra + ["--output_dir", f"outputs/bad_{code}"]
    proc = run(args, ws)
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hf-distill train: error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) <= 3, proc.stderr
    assert digest(ws / TEACHER) == before  # nothing on disk was lost


def test_feature_distillation_on_a_folder_without_labels(ws):
    """Label-free: a flat folder of images (no class sub-folders, so no label column) and the demo's teacher."""
    from hf_distill import load_model
    from hf_distill.data import digits_dataset

    root = ws / "unlabelled_images"
    root.mkdir(exist_ok=True)
    for i, image in enumerate(digits_dataset()["train"].select(range(120))["image"]):
        image.resize((24, 24)).save(root / f"{i:04d}.png")
    out = ws / "outputs" / "features_folder"
    proc = ok(run(["--distill_method", "feature", "--student_model_name_or_path", "resnet10t", "--no_student_pretrained",
                   "--in_chans", "1", "--image_size", "32", "--teacher_model_name_or_path", TEACHER,
                   "--dataset_name", "unlabelled_images", "--max_steps", "3", "--output_dir", str(out),
                   "--report_to", "none", "--use_cpu", "--logging_steps", "1"], ws))
    logs = logged(proc.stdout)
    assert any("loss_summary_teacher" in h and "loss_spatial_teacher" in h for h in logs)
    assert any("eval_feature_cosine" in h for h in logs)
    backbone = load_model(str(out), backbone=True)
    assert backbone.num_classes == 0
    assert "image-feature-extraction" in (out / "README.md").read_text()


def test_streaming_an_image_folder_with_split_folders(ws):
    """``--streaming`` on a folder with train/ and test/ sub-folders: training reads a shuffled stream, the
    evaluation split is loaded whole (its accuracy is over all of its images)."""
    from hf_distill.data import digits_dataset

    root = ws / "split_images"
    ds = digits_dataset()
    for split, n in (("train", 96), ("test", 30)):
        for i in range(n):
            example = ds[split][i]
            folder = root / split / str(example["label"])
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].resize((24, 24)).save(folder / f"{i:03d}.png")
    out = ws / "outputs" / "streamed"
    proc = ok(run(["--student_model_name_or_path", "resnet10t", "--no_student_pretrained", "--in_chans", "1",
                   "--image_size", "32", "--dataset_name", "split_images", "--streaming", "--teacher_model_name_or_path",
                   TEACHER, "--max_steps", "3", "--per_device_train_batch_size", "8", "--output_dir", str(out),
                   "--report_to", "none", "--use_cpu", "--logging_steps", "1"], ws))
    assert "on a stream of images (split_images); evaluating on 30 images" in proc.stdout
    assert_trained(out, 3, {"loss_ce", "loss_kd"}, proc.stdout)
    assert "'eval_teacher_accuracy'" in proc.stdout


def test_feature_cache_built_once_then_training_without_the_teacher(ws):
    """`cache-teacher --distill_method feature` on unlabelled images (pooled spatial map, float16), then a run
    that reads the features from the cache and loads no teacher."""
    from hf_distill import load_model
    from hf_distill.teacher_cache import load_teacher_cache

    root = ws / "unlabelled_for_cache"
    if not root.exists():
        from hf_distill.data import digits_dataset

        root.mkdir()
        for i, image in enumerate(digits_dataset()["train"].select(range(64))["image"]):
            image.resize((24, 24)).save(root / f"{i:04d}.png")
    common = ["--distill_method", "feature", "--student_model_name_or_path", "resnet10t", "--no_student_pretrained",
              "--in_chans", "1", "--image_size", "32", "--dataset_name", "unlabelled_for_cache",
              "--per_device_train_batch_size", "16", "--report_to", "none", "--use_cpu"]
    cache_dir = ws / "outputs" / "feature_cache"
    proc = ok(run(["cache-teacher", *common, "--teacher_model_name_or_path", TEACHER, "--teacher_cache_dir",
                   str(cache_dir), "--feature_grid", "1"], ws))
    assert "teacher cache ready" in proc.stdout
    cache = load_teacher_cache(cache_dir)
    assert cache.outputs == "features" and cache.feature_shapes[0]["spatial"][1:] == [1, 1]
    out = ws / "outputs" / "from_feature_cache"
    proc = ok(run(["train", *common, "--teacher_cache_dir", str(cache_dir), "--max_steps", "3", "--logging_steps", "1",
                   "--output_dir", str(out)], ws))
    logs = logged(proc.stdout)
    assert any("loss_summary_teacher" in h and "loss_spatial_teacher" in h for h in logs)
    assert load_model(str(out), backbone=True).num_classes == 0
