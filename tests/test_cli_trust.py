"""A command line a user can trust (issue 27): run folders as transformers' example scripts treat them, bad values
refused in one line before anything is loaded (flags, YAML and Python keywords), hints that name the real fix, and
k-NN evaluation from a separate labelled dataset.

Journeys run the `hf-distill` command in a subprocess in one shared workspace; the matrix of bad values runs
`cli.main` in-process with every loading function replaced by one that fails the test, so "refused before any
model or dataset is loaded" is asserted, not timed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

CLI = shutil.which("hf-distill", path=os.path.dirname(sys.executable)) or shutil.which("hf-distill")
TEACHER = "runs/teacher_tiny"
BASE = ["--student_model_name_or_path", "resnet10t", "--no_student_pretrained", "--in_chans", "1", "--image_size",
        "32", "--dataset_name", "sklearn-digits", "--teacher_model_name_or_path", TEACHER, "--report_to", "none",
        "--max_train_samples", "96", "--max_eval_samples", "32", "--per_device_train_batch_size", "16"]


def run(args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def _env(extra=None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.pop("HF_DISTILL_TRACEBACK", None)
    return env


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def error_line(proc, code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout[-1500:] + proc.stderr[-1500:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def logged_steps(stdout: str) -> list[int]:
    """Global steps of the training-loss logs (``logging_steps 1``): the epoch field times steps per epoch is not
    needed, the logs come in order, one per step."""
    return [i for i, line in enumerate(stdout.splitlines()) if line.startswith("{'loss'")]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A working directory with a small 10-class grey teacher in runs/teacher_tiny and image folders."""
    import timm

    from hf_distill.data import digits_dataset
    from hf_distill.models import InputSpec, save_native, set_input_spec

    assert CLI, "hf-distill is not installed next to this Python"
    ws = tmp_path_factory.mktemp("trust")
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    set_input_spec(teacher, InputSpec(mean=(0.5,), std=(0.5,), image_size=(32, 32), in_chans=1))
    save_native(teacher, ws / TEACHER)
    train = digits_dataset()["train"]
    (ws / "unlabelled").mkdir()
    for i in range(100):  # a labelled imagefolder (class sub-folders) and an unlabelled flat one
        example = train[i]
        (ws / "labelled" / str(example["label"])).mkdir(parents=True, exist_ok=True)
        example["image"].resize((24, 24)).save(ws / "labelled" / str(example["label"]) / f"{i:03d}.png")
        if i < 60:
            example["image"].resize((24, 24)).save(ws / "unlabelled" / f"{i:03d}.png")
    return ws


# --- 1. run folders ----------------------------------------------------------------------------------------------


def test_interrupted_run_is_resumed_by_the_same_command_then_true_resume_refusal_and_overwrite(ws):
    args = BASE + ["--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--output_dir",
                   "outputs/run", "--max_steps", "100000"]
    proc = subprocess.Popen([CLI, *args], cwd=ws, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (ws / "outputs/run/checkpoint-2/trainer_state.json").exists():  # the first complete checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    m = re.search(r"interrupted; the last checkpoint is (outputs/run/checkpoint-(\d+)): run the same command to "
                  r"continue from it \(hf-distill .*--output_dir outputs/run", err)
    assert m, err
    step = int(m.group(2))
    assert step >= 2 and (ws / m.group(1) / "trainer_state.json").exists()
    shutil.copytree(ws / "outputs/run", ws / "outputs/run_copy")

    # the same command (shorter) continues from that checkpoint, as transformers' examples do
    again = ok(run(args[:-1] + [str(step + 2)], ws))
    assert f"holds an unfinished run: resuming from outputs/run/checkpoint-{step}" in again.stdout
    assert "--overwrite_output_dir" in again.stdout  # the way to start from scratch instead
    state = json.loads((ws / "outputs/run/checkpoint-{}/trainer_state.json".format(step + 2)).read_text())
    assert state["global_step"] == step + 2
    assert len(logged_steps(again.stdout)) == 2  # steps step+1 and step+2 only: nothing from step 0 again

    # `--resume_from_checkpoint true` takes the newest checkpoint of --output_dir (not a folder named "true")
    copy = [a if a != "outputs/run" else "outputs/run_copy" for a in args[:-1]] + [str(step + 1)]
    resumed = ok(run(copy + ["--resume_from_checkpoint", "true"], ws))
    assert len(logged_steps(resumed.stdout)) == 1
    assert (ws / "outputs/run_copy/model.safetensors").exists()

    # a finished run is not trained over; the one line names both ways on
    line = error_line(run(copy, ws))
    assert "already holds a saved model" in line and "--overwrite_output_dir" in line
    assert "--resume_from_checkpoint" in line

    # --overwrite_output_dir replaces the whole run: no checkpoint of the old one is left to be resumed later
    fresh = ok(run([a if a != str(step + 1) else "2" for a in copy] + ["--overwrite_output_dir"], ws))
    assert "removed the previous run from outputs/run_copy" in fresh.stdout
    left = sorted(p.name for p in (ws / "outputs/run_copy").glob("checkpoint-*"))
    assert left == ["checkpoint-2"], left
    assert len(logged_steps(fresh.stdout)) == 2


# --- 2. values refused before anything is loaded ------------------------------------------------------------------

FLAG_CASES = {
    "image size 0": (["--image_size", "0"], r"--image_size must be >= 1, got 0"),
    "no training samples": (["--max_train_samples", "0"], r"--max_train_samples must be >= 1, got 0 \(leave it unset"),
    "fractional batch": (["--per_device_train_batch_size", "32.5"],
                         r"--per_device_train_batch_size must be an integer, got '32.5'"),
    "empty batch": (["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size must be >= 1, got 0"),
    "zero steps": (["--max_steps", "0"], r"--max_steps must be > 0"),
    "fitnets option with kd": (["--hint_layers", "layer1:layer1"],
                               r"--distill_method kd does not use --hint_layers \(an option of fitnets, byot\)"),
    "dkd option with kd": (["--dkd_beta", "2"], r"does not use --dkd_beta \(an option of dkd\)"),
    "byot option with kd": (["--byot_alpha", "0.5"], r"does not use --byot_alpha \(an option of byot\)"),
    "alpha with dkd": (["--distill_method", "dkd", "--alpha", "0.5"],
                       r"--distill_method dkd does not use --alpha: its terms are weighed by --dkd_alpha"),
    "two problems at once": (["--dkd_beta", "2", "--per_device_train_batch_size", "0"],
                             r"--per_device_train_batch_size must be >= 1.*; --distill_method kd does not use --dkd_beta"),
    "prefix of a flag": (["--temp", "3"], r"unknown flag --temp \(did you mean --temperature\?\)"),
}
YAML_CASES = {
    "list for a number": ("alpha: [0.5]\n", r"alpha: expected a number, got \[0.5\]"),
    "fractional batch": ("per_device_train_batch_size: 32.5\n", r"per_device_train_batch_size: expected an integer, "
                         r"got 32.5"),
    "YAML yes for a strategy": ("save_strategy: yes\n", r"save_strategy: expected one of no, steps, epoch, best, got "
                                r"true \(YAML reads an unquoted yes/no/on/off as true/false: quote the value\)"),
    "not a choice": ("mixup_mode: pixel\n", r"mixup_mode: 'pixel' is not one of batch, pair, elem"),
    "image size 0": ("image_size: 0\n", r"--image_size must be >= 1, got 0"),
    "three sizes": ("image_size: [32, 32, 3]\n", r"--image_size takes one value \(square\) or two"),
    "no training samples": ("max_train_samples: 0\n", r"--max_train_samples must be >= 1"),
    "another method's option": ("distill_method: dist\nhint_layers: [auto]\n",
                                r"--distill_method dist does not use --hint_layers"),
}


@pytest.fixture
def no_loading(monkeypatch):
    """Every function that loads a model or a dataset fails the test if called."""
    import hf_distill.cli.cache as cache_cli
    import hf_distill.cli.train as train_cli
    import hf_distill.data as data
    import hf_distill.models as models

    def forbidden(*args, **kwargs):
        raise AssertionError(f"loaded something before refusing: {args[:1]}")

    for module, name in ((models, "load_model"), (data, "load_image_dataset"), (data, "load_image_split"),
                         (train_cli, "load_splits"), (train_cli, "load_student"), (train_cli, "load_teachers"),
                         (cache_cli, "load_splits"), (cache_cli, "load_student"), (cache_cli, "load_teachers")):
        monkeypatch.setattr(module, name, forbidden)


def _main(argv, capsys) -> tuple[int, str]:
    from hf_distill.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags_are_refused_in_one_line_before_loading(case, no_loading, capsys, tmp_path):
    extra, message = FLAG_CASES[case]
    code, err = _main(BASE + extra + ["--output_dir", str(tmp_path / "out")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), err


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_config_values_are_refused_in_one_line_before_loading(case, no_loading, capsys, tmp_path):
    text, message = YAML_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    flags = [a for i, a in enumerate(BASE)  # without the flags whose values the file gives
             if a not in ("--image_size", "--max_train_samples") and BASE[i - 1] not in ("--image_size", "--max_train_samples")]
    code, err = _main(flags + ["--config", str(config), "--output_dir", str(tmp_path / "out")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), err


def test_config_values_are_read_as_a_yaml_user_means_them(tmp_path):
    from hf_distill.cli import parse_train_args

    config = tmp_path / "run.yaml"
    config.write_text("image_size: [32, 24]\nsave_strategy: no\nlearning_rate: 1e-3\nteacher_model_name_or_path: a\n"
                      "per_device_train_batch_size: 16.0\n")
    model_args, _, training_args = parse_train_args(["--config", str(config), "--output_dir", str(tmp_path)])
    assert model_args.image_hw == (32, 24)
    assert training_args.save_strategy == "no" and training_args.learning_rate == 1e-3
    assert training_args.teacher_names == ["a"] and training_args.per_device_train_batch_size == 16
    model_args, _, _ = parse_train_args(["--image_size", "40", "--output_dir", str(tmp_path)])
    assert model_args.image_hw == (40, 40)


def test_python_keywords_are_checked_in_keyword_terms(tmp_path):
    from hf_distill import DistillationTrainingArguments

    def refused(**kw) -> str:
        with pytest.raises(ValueError) as info:
            DistillationTrainingArguments(output_dir=str(tmp_path), report_to="none", **kw)
        assert "--" not in str(info.value)
        return str(info.value)

    assert refused(per_device_train_batch_size=32.5) == "per_device_train_batch_size must be an integer, got 32.5"
    assert refused(alpha=[0.5]) == "alpha must be a number, got [0.5]"
    assert refused(dkd_beta=2.0) == "distill_method='kd' does not use dkd_beta (an option of dkd)"
    assert refused(distill_method="dkd", alpha=0.5).startswith("distill_method='dkd' does not use alpha: its terms")
    assert "hint_layers (an option of fitnets, byot)" in refused(distill_method="dist", hint_layers=["auto"])
    # what a method does use is accepted: BYOT takes FitNets hints
    DistillationTrainingArguments(output_dir=str(tmp_path), report_to="none", distill_method="byot",
                                  hint_layers=["layer1:layer1"], hint_weight=1.0)


def test_bf16_without_use_cpu_trains_on_a_cpu_only_machine(tmp_path):
    import torch

    from hf_distill import DistillationTrainingArguments

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bf16 runs there")
    args = DistillationTrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=True)
    assert args.use_cpu and args.bf16 and args.device.type == "cpu"
    assert not args.dataloader_pin_memory  # no accelerator to pin for: torch would warn at every dataloader


# --- 3. hints that name the real fix ------------------------------------------------------------------------------


def test_hints_name_the_real_fix(ws):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=16)).save_pretrained(ws / "runs/dino_backbone")
    cases = {
        "mistyped teacher folder": (["--teacher_model_name_or_path", "runs/teacher_tin"], 1,
                                    r"no folder 'runs/teacher_tin' \(did you mean runs/teacher_tiny\?\)"),
        "mistyped dataset folder": (["--dataset_name", "labeled"], 1, r"no folder 'labeled' \(did you mean labelled\b"),
        "timm weights offline": (["--student_model_name_or_path", "resnet18", "--student_pretrained", "true"], 1,
                                 r"pretrained weights of timm's 'resnet18'.*--no_student_pretrained.*"
                                 r"hf download timm/resnet18\.[a-z0-9_]+"),
        "backbone as KD teacher": (["--teacher_model_name_or_path", "runs/dino_backbone"], 1,
                                   r"is a Dinov2Model backbone without a classification head.*"
                                   r"--distill_method feature"),
    }
    for case, (extra, code, message) in cases.items():
        line = error_line(run(BASE + extra + ["--output_dir", "outputs/hint"], ws), code)
        assert re.search(message, line), (case, line)
        assert "hf download runs/" not in line and "on the Hub (" not in line, (case, line)


# --- 4. parity: k-NN from a separate labelled dataset, adapter line -------------------------------------------------


def test_knn_from_a_separate_labelled_folder_while_training_on_an_unlabelled_one(ws):
    proc = ok(run(["--distill_method", "feature", "--student_model_name_or_path", "resnet10t", "--no_student_pretrained",
                   "--in_chans", "1", "--image_size", "32", "--teacher_model_name_or_path", TEACHER, "--dataset_name",
                   "unlabelled", "--knn_dataset_name", "labelled", "--max_steps", "2", "--report_to", "none",
                   "--per_device_train_batch_size", "16", "--output_dir", "outputs/knn"], ws))
    metrics = json.loads(proc.stdout[proc.stdout.index("{\n"):proc.stdout.index("\n}") + 2])
    assert 0.0 <= metrics["eval_knn_accuracy"] <= 1.0 and "eval_teacher_knn_accuracy" in metrics
    assert "on 60 images (unlabelled)" in proc.stdout  # every unlabelled image trains: evaluation is elsewhere
    assert re.search(r"^teacher 0 \(.*\): input adapter: ", proc.stdout, re.M)  # visible at default verbosity
    assert "pin_memory" not in proc.stderr


def test_last_checkpoint_skips_one_whose_save_was_cut_short(tmp_path):
    from hf_distill.cli import last_checkpoint

    for step, complete in ((2, True), (10, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # by step number, not by name
    assert last_checkpoint(tmp_path / "missing") is None


def test_backbone_load_report_is_one_line_and_config_only_statistics_are_called_a_guess(tmp_path, capfd, caplog):
    import logging

    from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

    from hf_distill import load_model
    from hf_distill.models import IMAGENET_MEAN, input_spec

    config = Dinov2Config(image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=16, num_labels=10)
    Dinov2ForImageClassification(config).save_pretrained(tmp_path / "cls")
    Dinov2Model(config).save_pretrained(tmp_path / "backbone")
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="hf_distill.models"):
        backbone = load_model(str(tmp_path / "cls"), backbone=True)  # the classifier's head is left out
    assert type(backbone).__name__ == "Dinov2Model"
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert "2 checkpoint weights unused (classifier.bias, classifier.weight)" in caplog.text
    spec = input_spec(load_model(str(tmp_path / "backbone"), backbone=True))  # no preprocessor_config.json
    assert spec.mean == IMAGENET_MEAN and "guessed from model_type 'dinov2'" in spec.source
