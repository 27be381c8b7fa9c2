import json
from pathlib import Path

import pytest
import torch
import yaml

from hf_distill.cli import UsageError, main, parse_train_args

TINY = ["--student_model_name_or_path", "test_resnet", "--student_pretrained", "false", "--in_chans", "1",
        "--image_size", "16", "--dataset_name", "sklearn-digits", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--per_device_train_batch_size", "16", "--report_to", "none",
        "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0"]


def test_config_file_with_command_line_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "distill_method": "fitnets",
                                   "hint_layers": ["layer1:layer2"], "temperature": 2.0, "alpha": 0.5,
                                   "teacher_model_name_or_path": "org/teacher", "learning_rate": 0.1}))
    model_args, data_args, args = parse_train_args(["--config", str(cfg), "--alpha", "0.7",
                                                    "--student_model_name_or_path", "resnet18"])
    assert args.distill_method == "fitnets" and args.temperature == 2.0 and args.learning_rate == 0.1
    assert args.alpha == 0.7  # the flag wins over the file
    assert args.teacher_names == ["org/teacher"] and args.hint_layers == ["layer1:layer2"]
    assert model_args.student_model_name_or_path == "resnet18"
    jcfg = tmp_path / "run.json"
    jcfg.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "teacher_model_name_or_path": ["a", "b"]}))
    assert parse_train_args(["--config", str(jcfg)])[2].teacher_names == ["a", "b"]


def test_unknown_config_key_suggests_the_right_one(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("temprature: 2.0\n")
    with pytest.raises(UsageError, match="temprature.*did you mean temperature"):
        parse_train_args(["--config", str(cfg)])


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--teacher_model_name_or_path", "--distill_method", "--temperature", "--alpha", "--hint_layers",
                 "--byot_alpha", "--sftn_student_model", "--teacher_noise_std", "--dataset_name", "--learning_rate"):
        assert flag in text, flag


def test_cli_trains_teacher_then_distills_from_it(tmp_path, capsys):
    import timm

    teacher_dir = tmp_path / "teacher"
    main(TINY + ["--output_dir", str(teacher_dir), "--distill_method", "supervised", "--max_steps", "3"])
    assert (teacher_dir / "model.safetensors").exists() and (teacher_dir / "README.md").exists()
    student_dir = tmp_path / "student"
    main(["train"] + TINY + ["--output_dir", str(student_dir), "--teacher_model_name_or_path", str(teacher_dir),
                             "--max_steps", "3", "--logging_steps", "1"])
    out = capsys.readouterr().out
    assert '"eval_accuracy"' in out and '"eval_teacher_accuracy"' in out
    model = timm.create_model(f"local-dir:{student_dir}", pretrained=True)
    assert model.num_classes == 10 and model.pretrained_cfg["label_names"][0] == "0"
    assert model.eval()(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


def test_cli_sftn_runs_both_phases(tmp_path):
    out = tmp_path / "sftn"
    main(TINY + ["--output_dir", str(out), "--distill_method", "sftn", "--sftn_student_model", "test_resnet",
                 "--sftn_distill_method", "kd", "--max_steps", "2"])
    assert "SFTN teacher" in (out / "README.md").read_text()
    assert (out / "student" / "model.safetensors").exists()
    card = (out / "student" / "README.md").read_text()
    assert "kd" in card.lower()


def test_layers_command_lists_shapes(capsys):
    main(["layers", "test_resnet", "--image-size", "32", "--stages-only"])
    text = capsys.readouterr().out
    assert "layer1" in text and "layer4" in text and "32" in text


def test_cli_cache_teacher_then_train_without_running_the_teacher(tmp_path, capsys):
    teacher_dir, cache = tmp_path / "teacher", tmp_path / "cache"
    main(TINY + ["--output_dir", str(teacher_dir), "--distill_method", "supervised", "--max_steps", "2"])
    main(["cache-teacher"] + TINY + ["--output_dir", str(tmp_path / "x"), "--teacher_model_name_or_path",
                                     str(teacher_dir), "--teacher_cache_dir", str(cache)])
    assert (cache / "cache_info.json").exists()
    out = tmp_path / "student"
    main(TINY + ["--output_dir", str(out), "--teacher_cache_dir", str(cache), "--max_steps", "2",
                 "--logging_steps", "1"])
    assert (out / "model.safetensors").exists()
    text = capsys.readouterr().out
    assert '"eval_accuracy"' in text and "eval_teacher_accuracy" not in text  # no teacher was loaded



EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("config", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_configs_parse(config, tmp_path):
    model_args, data_args, args = parse_train_args(["--config", str(EXAMPLES / config), "--output_dir", str(tmp_path)])
    assert config.startswith(args.distill_method)  # e.g. byot_digits.yaml -> byot
    assert model_args.student_model_name_or_path and data_args.dataset_name


def test_cli_evaluates_at_the_training_batch_size_unless_told(tmp_path):
    base = ["--output_dir", str(tmp_path), "--per_device_train_batch_size", "48"]
    assert parse_train_args(base)[2].per_device_eval_batch_size == 48  # transformers' default would be 8
    assert parse_train_args(base + ["--per_device_eval_batch_size", "16"])[2].per_device_eval_batch_size == 16


def test_flags_are_never_abbreviated(tmp_path):
    with pytest.raises(UsageError, match="unknown flag --num_train_epoch .*did you mean --num_train_epochs"):
        parse_train_args(["--output_dir", str(tmp_path), "--num_train_epoch", "3"])


def test_cli_function_matching_from_a_mixed_cache(tmp_path, capsys):
    teacher_dir, cache = tmp_path / "teacher", tmp_path / "cache"
    main(TINY + ["--output_dir", str(teacher_dir), "--distill_method", "supervised", "--max_steps", "2"])
    common = TINY + ["--distill_method", "function_matching", "--cutmix_alpha", "1.0", "--mixup_mode", "elem"]
    assert main(["cache-teacher"] + common + ["--output_dir", str(tmp_path / "x"), "--teacher_model_name_or_path",
                                               str(teacher_dir), "--teacher_cache_dir", str(cache),
                                               "--cache_epochs", "2"]) == 0
    out = tmp_path / "student"
    assert main(common + ["--output_dir", str(out), "--teacher_cache_dir", str(cache), "--max_steps", "6",
                          "--logging_steps", "1"]) == 0
    text = capsys.readouterr().out
    assert '"eval_accuracy"' in text and (out / "model.safetensors").exists()
    # the same cache with other mixing is refused, in one line
    assert main(common[:-4] + ["--output_dir", str(tmp_path / "s2"), "--teacher_cache_dir", str(cache),
                               "--mixup_alpha", "0.3", "--max_steps", "2"]) == 1
    assert "mixup_alpha" in capsys.readouterr().err


def test_a_non_square_image_size_becomes_the_students_input():
    from hf_distill.arguments import ModelArguments
    from hf_distill.cli import load_student
    from hf_distill.models import input_spec

    args = ModelArguments(student_model_name_or_path="resnet18", student_pretrained=False, image_size=[32, 48])
    student = load_student(args, None, "label", backbone=True)
    assert tuple(input_spec(student).image_size) == (32, 48)
    assert student(torch.zeros(1, 3, 32, 48)).shape[0] == 1
