"""The ``hf-distill`` command line (also ``python -m hf_distill``).

    hf-distill [train] --config run.yaml [--flag value ...]   distill (flags override the file)
    hf-distill demo [--output_dir DIR]                        embedded offline demo
    hf-distill layers MODEL [--image-size N]                  candidate hint layers and shapes
    hf-distill cache-teacher --teacher_cache_dir DIR [...]    teacher outputs computed once (FKD)

Every field of :class:`ModelArguments`, :class:`DataArguments` and
:class:`DistillationTrainingArguments` is a flag; ``hf-distill train --help`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

COMMANDS = ("train", "demo", "layers", "cache-teacher")


def _parser():
    from transformers import HfArgumentParser

    from .arguments import DataArguments, DistillationTrainingArguments, ModelArguments

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, DistillationTrainingArguments),
        prog="hf-distill train",
        description="Distill a teacher into a student (any timm / transformers image classifier).",
    )
    parser.add_argument(
        "--config", default=None,
        help="YAML or JSON file with any of these arguments; flags on the command line override it.",
    )
    return parser


def load_config_file(path: str | Path) -> dict:
    """A config file's arguments as a dict (YAML or JSON, chosen by extension)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    return data


def parse_train_args(argv: Sequence[str]):
    """(model_args, data_args, training_args) from flags and an optional ``--config`` file."""
    parser = _parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        config = load_config_file(known.config)
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(config) - valid)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
            detail = ", ".join(f"{k}" + (f" (did you mean {v[0]}?)" if v else "") for k, v in hints.items())
            raise SystemExit(f"{known.config}: unknown argument(s): {detail}")
        parser.set_defaults(**config)
    *groups, rest = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    if rest:
        raise SystemExit(f"unrecognised arguments: {' '.join(rest)}")
    model_args, data_args, training_args = groups[:3]  # groups[3] holds --config itself
    return model_args, data_args, training_args


def load_splits(data_args, seed: int, cache_dir: str | None = None):
    """(train, eval) raw datasets exactly as every command sees them (same split, same subset)."""
    from .data import load_image_dataset, split_train_eval

    if not data_args.dataset_name:
        raise SystemExit("--dataset_name is required (a Hub dataset, a folder, or sklearn-digits)")
    dsd = load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir)
    train, evaluation = split_train_eval(dsd, data_args.train_split, data_args.eval_split, data_args.eval_fraction,
                                         seed, data_args.label_column_name)
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def load_student(model_args, train, label_column: str):
    """The student named in the arguments, with the dataset's classes and the requested input size."""
    from .data import label_names
    from .models import input_spec, load_model, set_input_spec

    if not model_args.student_model_name_or_path:
        raise SystemExit("--student_model_name_or_path is required")
    names = label_names(train, label_column)
    num_labels = len(names) if names else len(set(train[label_column]))
    student_kw = {"in_chans": model_args.in_chans} if model_args.in_chans else {}
    student = load_model(
        model_args.student_model_name_or_path, num_labels=num_labels, pretrained=model_args.student_pretrained,
        revision=model_args.student_revision, cache_dir=model_args.cache_dir, label_names=names, **student_kw,
    )
    if model_args.image_size:
        size = (model_args.image_size, model_args.image_size)
        set_input_spec(student, dataclasses.replace(input_spec(student), image_size=size))
    return student


def load_teachers(model_args, training_args):
    from .models import load_model

    return [
        load_model(name, pretrained=model_args.teacher_pretrained, revision=training_args.teacher_revision,
                   cache_dir=model_args.cache_dir)
        for name in training_args.teacher_names
    ]


def run_training(model_args, data_args, training_args, print_fn=print):
    """Load data and models as the arguments say, distill, evaluate, save the student. Returns metrics."""
    from .data import with_image_transform
    from .models import input_spec
    from .trainer import DistillationTrainer

    train, evaluation = load_splits(data_args, training_args.seed, model_args.cache_dir)
    student = load_student(model_args, train, data_args.label_column_name)
    spec = input_spec(student)
    columns = {"image_column": data_args.image_column_name, "label_column": data_args.label_column_name}
    if training_args.teacher_cache_dir:
        from .teacher_cache import with_teacher_cache

        # soft labels (and the exact views) come from the cache; a teacher is loaded only if named
        train_dataset = with_teacher_cache(train, training_args.teacher_cache_dir, spec, **columns)
    else:
        train_dataset = with_image_transform(train, spec, True, data_args.train_augmentation, **columns)
    teachers = load_teachers(model_args, training_args)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teachers or None,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=with_image_transform(evaluation, spec, False, **columns),
    )
    trainer.card_info.update(dataset=data_args.dataset_name)
    if training_args.do_train or not training_args.do_eval:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()
    print_fn(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))
    print_fn(f"model saved to {training_args.output_dir}")
    if training_args.distill_method == "sftn" and training_args.sftn_distill_method:
        # phase 2: distill the student SFTN made its teacher friendly to, from that teacher
        student_args = dataclasses.replace(
            training_args, distill_method=training_args.sftn_distill_method, temperature=None,
            output_dir=os.path.join(training_args.output_dir, "student"),
            teacher_model_name_or_path=[training_args.output_dir],  # the saved SFTN teacher, reloaded
            resume_from_checkpoint=None,
        )
        student_model_args = dataclasses.replace(
            model_args, student_model_name_or_path=training_args.sftn_student_model, student_pretrained=False)
        print_fn(f"SFTN phase 2: distilling {training_args.sftn_student_model} with "
                 f"{training_args.sftn_distill_method}")
        return run_training(student_model_args, data_args, student_args, print_fn)
    return metrics


def _cache_teacher_main(argv: Sequence[str]) -> int:
    """``hf-distill cache-teacher``: run the teacher(s) once over the training data, store soft labels."""
    from transformers import HfArgumentParser

    from .arguments import DataArguments, DistillationTrainingArguments, ModelArguments
    from .models import input_spec
    from .teacher_cache import build_teacher_cache

    @dataclasses.dataclass
    class CacheArguments:
        cache_epochs: int = dataclasses.field(
            default=1, metadata={"help": "Epochs of views to store (random views differ per epoch; 'none' needs 1)."})
        top_k: int = dataclasses.field(default=0, metadata={"help": "Keep only the top-k logits (0: all)."})
        cache_batch_size: int = dataclasses.field(
            default=0, metadata={"help": "Teacher batch size (default: per_device_train_batch_size, which makes "
                                 "cached training bit-identical to live-teacher training)."})
        overwrite: bool = dataclasses.field(default=False, metadata={"help": "Rebuild a cache built from other inputs."})

    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationTrainingArguments, CacheArguments),
                              prog="hf-distill cache-teacher",
                              description="Compute the teacher's outputs once and store them in --teacher_cache_dir.")
    model_args, data_args, args, cache_args = parser.parse_args_into_dataclasses(args=list(argv))
    if not args.teacher_cache_dir or not args.teacher_names:
        raise SystemExit("--teacher_cache_dir and --teacher_model_name_or_path are required")
    train, _ = load_splits(data_args, args.seed, model_args.cache_dir)
    student = load_student(model_args, train, data_args.label_column_name)
    cache = build_teacher_cache(
        load_teachers(model_args, args), train, input_spec(student), args.teacher_cache_dir,
        epochs=cache_args.cache_epochs, augmentation=data_args.train_augmentation, top_k=cache_args.top_k or None,
        batch_size=cache_args.cache_batch_size or args.per_device_train_batch_size, seed=args.seed,
        teacher_id=args.teacher_names, teacher_revision=args.teacher_revision,
        image_column=data_args.image_column_name, label_column=data_args.label_column_name,
        overwrite=cache_args.overwrite,
    )
    print(f"teacher cache ready in {args.teacher_cache_dir} ({cache})")
    return 0


def _layers_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-distill layers",
                                     description="List a model's modules with output shapes (hint-layer candidates).")
    parser.add_argument("model", help="timm name, hf-hub:org/name, local folder or transformers repo id")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--in-chans", type=int, default=None, help="input channels for timm names (default 3)")
    parser.add_argument("--stages-only", action="store_true", help="only the stage outputs")
    parser.add_argument("--pretrained", action="store_true", help="load pretrained weights (not needed for shapes)")
    args = parser.parse_args(argv)
    from .models import input_spec, load_model
    from .taps import describe_layers, format_layers

    kw = {"in_chans": args.in_chans} if args.in_chans else {}
    model = load_model(args.model, pretrained=args.pretrained, **kw)
    size = args.image_size or input_spec(model).image_size[0]
    rows = describe_layers(model, image_size=size)
    if args.stages_only:
        rows = [r for r in rows if r.get("stage")]
    print(format_layers(rows))
    return 0


def _demo_main(argv: Sequence[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "demo":
        return _demo_main(argv)
    if command == "layers":
        return _layers_main(argv)
    if command == "cache-teacher":
        return _cache_teacher_main(argv)
    model_args, data_args, training_args = parse_train_args(argv)
    run_training(model_args, data_args, training_args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
