"""The training data as a run reads it: the batch mixer and the epoch order, streams' epochs and shards.

One set-up path, shared by the trainer's construction and every hyperparameter-search trial (a trial
that turns mixing on must read the data in the epoch order too).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..data import class_names_for, is_stream
from ..methods import Progress
from ..mixing import BatchMixer, EpochOrderedDataset
from ..models import num_classes_of, set_label_names
from ..teachers import check_label_spaces

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    dataset: object  # what the Trainer reads (in the epoch order when mixing)
    mixer: BatchMixer | None  # mixup / CutMix, applied once per batch for student and teachers
    # optimizer steps in one pass over a stream (0: unknown length); None for map-style data (the Trainer counts)
    stream_epoch_steps: int | None

    def progress(self, state, args, steps_per_epoch: int) -> Progress:
        """Where training stands, for the methods' schedules: a stream counts epochs of its own length (the
        Trainer's epoch of a stream is max_steps long)."""
        steps = self.stream_epoch_steps
        if steps is not None:
            return Progress(step=state.global_step, max_steps=state.max_steps,
                            epoch=state.global_step / steps if steps else 0.0,
                            num_epochs=state.max_steps / steps if steps else 0.0, steps_per_epoch=steps)
        return Progress(step=state.global_step, max_steps=state.max_steps, epoch=state.epoch or 0.0,
                        num_epochs=float(getattr(state, "num_train_epochs", 0) or args.num_train_epochs),
                        steps_per_epoch=steps_per_epoch)


def training_data(args, method, student, teachers, raw_dataset) -> TrainingData:
    """The run's reading of ``raw_dataset`` (refusing what the method's schedule or the mixing cannot use)."""
    mixer, data = _mixing(args, student, teachers, raw_dataset)
    steps = stream_steps_per_epoch(args, data)
    counted = [a for a in method.epoch_arguments if getattr(args, a, None)]
    if steps == 0 and counted:
        raise ValueError(f"{counted[0]} counts epochs, but the training stream has no known length to count them "
                         f"in: set {counted[0]}=0, or give the stream its length (info.splits, as "
                         "load_dataset(..., streaming=True) does), or train on map-style data")
    return TrainingData(data, mixer, steps)


def align_label_spaces(method, student, teachers, dataset) -> None:
    """A classifier student gets the class names (the dataset's ClassLabel, else the teachers', as the CLI
    does) and must predict the teachers' classes; backbone features have no label space."""
    if method.student_output == "logits":
        set_label_names(student, class_names_for(student, dataset, teachers))
        check_label_spaces(student, teachers)


def stream_steps_per_epoch(args, dataset) -> int | None:
    """Optimizer steps in one pass over a stream (from its split's number of examples; 0 when unknown); None for
    map-style data, whose epochs the Trainer counts itself (for a stream it takes max_steps for one)."""
    if not is_stream(dataset):
        return None
    splits, split = getattr(dataset.info, "splits", None), getattr(dataset, "split", None)
    rows = splits[str(split)].num_examples if splits and split is not None and str(split) in splits else 0
    if not rows:
        return 0
    batches = math.ceil(rows / (args.per_device_train_batch_size * max(1, args.world_size)))
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def split_stream_by_shard(args, train_dataset) -> None:
    """With several processes, a stream of at least as many shards as processes is split by shard, each
    process reading only its own (accelerate's default for streams: the first process reads, decodes and
    sends every batch); fewer shards keep that default."""
    if not is_stream(train_dataset) or args.world_size < 2:
        return
    config = args.accelerator_config
    if getattr(config, "dispatch_batches", None) is None and train_dataset.n_shards >= args.world_size:
        config.dispatch_batches = False
        logger.info("stream of %d shards on %d processes: each process reads its own shards",
                    train_dataset.n_shards, args.world_size)


def _mixing(args, student, teachers, train_dataset):
    """(the batch mixer, the training data in its epoch order) when mixup / CutMix is on."""
    if not args.mixing.enabled:
        return None, train_dataset
    if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
        raise ValueError("dataloader_persistent_workers would freeze the epoch order of mixed batches in the "
                         "workers (set_epoch never reaches them): leave it off with mixup / CutMix")
    n_classes = num_classes_of(student) or next((num_classes_of(t) for t in teachers if num_classes_of(t)), None)
    if n_classes is None:
        raise ValueError("mixup / CutMix needs the number of classes for the mixed labels: give the student a "
                         "num_classes (timm) / num_labels (transformers) attribute")
    seed = args.data_seed if args.data_seed is not None else args.seed
    mixer = BatchMixer(args.mixing, n_classes, seed)
    if train_dataset is not None and not getattr(train_dataset, "ordered_by_epoch", False):
        if not hasattr(train_dataset, "__len__"):
            raise ValueError("mixup / CutMix with a dataset without a length (a stream) is not supported: the "
                             "mixed batches follow a per-epoch order of the whole dataset")
        # a sample is mixed with its batch partner: batches follow a fixed per-epoch order so that where
        # a batch sits decides its mixing (and a teacher-output cache can replay it)
        train_dataset = EpochOrderedDataset(train_dataset, seed)
    return mixer, train_dataset
