"""Evaluation: what a batch predicts, and the metrics — the student's, the method's, the teachers'.

Every method is evaluated the same way: the student's logits (when it has a classifier) and what the
method names (:meth:`~hf_distill.methods.DistillationMethod.evaluate`): ``[batch, classes]`` outputs
are scored as ``{name}_accuracy``, ``[batch]`` values are averaged as ``{name}``. The teachers'
logits, collected once per example, give ``teacher_accuracy`` / ``teacher_agreement`` /
``teacher_kl``; backbone features and a k-NN memory give ``knn_accuracy``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.features import backbone_features, knn_accuracy
from ..methods import StepOutputs
from ..models import display_name
from ..preprocessing import with_own_teacher_accuracy
from ..teachers import teacher_keys

logger = logging.getLogger(__name__)

STUDENT = ""  # the name of the student's own logits among the predictions (scored as "accuracy")


def _load_accuracy():
    """``evaluate``'s accuracy metric, or None where it cannot be fetched (offline, first use)."""
    try:
        import evaluate

        return evaluate.load("accuracy")
    except Exception as err:  # evaluate fetches metric scripts from the Hub on first use
        logger.info("evaluate.load('accuracy') unavailable (%s); computing accuracy locally", type(err).__name__)
        return None


_ACCURACY = None


def _concat(value):
    # with eval_do_concat_batches=False the Trainer hands over a list of per-batch arrays
    if isinstance(value, list):
        return np.concatenate([np.asarray(v) for v in value])
    return np.asarray(value)


def _accuracy(logits, labels) -> float:
    global _ACCURACY
    pred_ids = _concat(logits).argmax(-1)
    labels = _concat(labels)
    if _ACCURACY is None:
        _ACCURACY = _load_accuracy() or False
    if _ACCURACY:
        return float(_ACCURACY.compute(predictions=pred_ids, references=labels)["accuracy"])
    return float((pred_ids == labels).mean())


def _length(dataset) -> int | None:
    return len(dataset) if hasattr(dataset, "__len__") else None  # a stream has none


def teacher_metrics(student_logits: np.ndarray, teacher_logits: np.ndarray, labels=None) -> dict[str, float]:
    """The teacher's accuracy (with labels), and how far the student follows it: top-1 agreement and the
    mean ``KL(teacher || student)`` at temperature 1."""
    s, t = np.asarray(student_logits, dtype=np.float64), np.asarray(teacher_logits, dtype=np.float64)
    if s.shape != t.shape:
        raise RuntimeError(f"teacher logits {t.shape} do not line up with the student's {s.shape}")

    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_ps, log_pt = log_softmax(s), log_softmax(t)
    metrics = {"teacher_agreement": float((s.argmax(-1) == t.argmax(-1)).mean()),
               "teacher_kl": float((np.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean())}
    if labels is not None:
        metrics["teacher_accuracy"] = float((t.argmax(-1) == _concat(labels)).mean())
    return metrics


def prediction_metrics(eval_pred, names: Sequence[str]) -> dict[str, float]:
    """Default ``compute_metrics``: each prediction named in ``names`` (the student's own logits are
    ``STUDENT``) scored by its shape — logits as top-1 accuracy (with labels), per-sample values as their mean."""
    preds = eval_pred.predictions
    if isinstance(preds, list) and preds and isinstance(preds[0], (tuple, list)):  # per batch, several outputs
        preds = tuple(list(p) for p in zip(*preds))
    elif not isinstance(preds, tuple):
        preds = (preds,)
    labels, metrics = eval_pred.label_ids, {}
    for name, values in zip(names, preds):
        values = _concat(values)
        if values.ndim == 1:
            metrics[name] = float(values.mean())
        elif labels is not None:  # unlabelled evaluation data: logits have nothing to be scored against
            metrics[f"{name}_accuracy" if name else "accuracy"] = _accuracy(values, labels)
    return metrics


class Evaluation:
    """One evaluation's predictions and extra metrics, for a trainer (its method, teachers and accelerator)."""

    def __init__(self):
        self.names: list[str] = [STUDENT]  # what each prediction column is (prediction_metrics)
        self._teacher_batches: list[torch.Tensor] | None = None  # teacher logits of the running evaluation
        self._own_teacher_accuracy: dict[tuple, list] = {}  # each teacher's accuracy, its own preprocessing
        self._teacher_knn: dict[tuple, dict[str, float]] = {}

    def predict(self, trainer, out: dict, inputs: dict, prediction_loss_only: bool):
        """(loss, predictions, labels) of one batch: ``eval_loss`` is the student's label cross-entropy."""
        labels, logits = inputs.get("labels"), out["logits"]
        logits = logits.float() if logits is not None else None
        loss = F.cross_entropy(logits, labels).detach() if logits is not None and labels is not None else None
        if prediction_loss_only:
            return loss, None, None
        source = trainer.teacher_source
        if self._teacher_batches is not None:
            logits_t = source.eval_logits(inputs["pixel_values"])
            self._teacher_batches.append(trainer.accelerator.gather_for_metrics(
                logits_t.to(inputs["pixel_values"].device)).cpu())
        teacher_features = {}
        if trainer.method.teacher_output == "features" and len(source):
            teacher_features = source.feature_maps(inputs["pixel_values"])
        step = StepOutputs(student_logits=logits, labels=labels, student_features=out["features"],
                           teacher_features=teacher_features, extra_outputs=out["extra"], progress=trainer.progress)
        named = {**trainer.method.evaluate(step), **out["heads"]}
        self.names = ([STUDENT] if logits is not None else []) + list(named)
        preds = ([logits] if logits is not None else []) + [v.float() for v in named.values()]
        if not preds:
            return loss, None, None
        preds = tuple(p.detach() for p in preds)
        return loss, (preds if len(preds) > 1 else preds[0]), labels

    def start(self, trainer, dataloader, loss_only: bool) -> None:
        self._teacher_batches = [] if trainer.args.eval_teacher and not loss_only and \
            trainer.teacher_source.gives_logits else None

    def finish(self, trainer, output, dataloader, prefix: str):
        """The evaluation's extra metrics: the teachers', the per-sample values of an unlabelled set (the Trainer
        calls compute_metrics only with labels), k-NN accuracy."""
        batches, self._teacher_batches = self._teacher_batches, None
        if batches and output.predictions is not None:
            teacher = torch.cat(batches).numpy()
            preds = output.predictions
            student = preds[0] if isinstance(preds, tuple) else preds
            measured = teacher_metrics(_concat(student), teacher, output.label_ids)
            measured = with_own_teacher_accuracy(measured, list(trainer.teachers.models), dataloader.dataset,
                                                 self._own_teacher_accuracy, trainer.student_spec)
            output.metrics.update({f"{prefix}_{name}": value for name, value in measured.items()})
        if output.predictions is not None and output.label_ids is None and STUDENT not in self.names:
            from transformers import EvalPrediction

            values = prediction_metrics(EvalPrediction(output.predictions, None), self.names)
            output.metrics.update({f"{prefix}_{k}": v for k, v in values.items() if f"{prefix}_{k}" not in
                                   output.metrics})
        if trainer.knn_train_dataset is not None and trainer.method.student_output == "features":
            output.metrics.update({f"{prefix}_{k}": v for k, v in self._knn_metrics(trainer, dataloader).items()})
        return output

    @torch.no_grad()
    def _summary_features(self, trainer, dataloader, teachers: bool = False):
        """Summary features of the student (or of each teacher) over a dataloader, gathered, with the labels."""
        rows, labels = [], []
        student = trainer.student
        gather = trainer.accelerator.gather_for_metrics
        for batch in dataloader:
            batch = trainer._prepare_inputs(batch)
            if "labels" not in batch:
                raise ValueError("k-NN accuracy needs labels in both the k-NN training set and the evaluation set")
            x = batch["pixel_values"]
            if teachers:
                rows.append([gather(s.float()).cpu() for s, _ in trainer.teachers.backbone_features(x)])
            else:
                with trainer.autocast_smart_context_manager():
                    summary, _ = backbone_features(student, x.to(next(student.parameters()).dtype))
                rows.append([gather(summary.float()).cpu()])
            labels.append(gather(batch["labels"]).cpu())
        return [torch.cat(column) for column in zip(*rows)], torch.cat(labels)

    def _knn_metrics(self, trainer, eval_dataloader) -> dict[str, float]:
        """DINO's k-NN top-1 of the student's summary features and, once per dataset, of each teacher's."""
        memory = trainer.get_eval_dataloader(trainer.knn_train_dataset)
        container = trainer._container
        was_training = container.training
        container.eval()
        try:
            (train_s,), train_y = self._summary_features(trainer, memory)
            (test_s,), test_y = self._summary_features(trainer, eval_dataloader)
            metrics = {"knn_accuracy": knn_accuracy(train_s, train_y, test_s, test_y)}
            key = (id(trainer.knn_train_dataset), id(eval_dataloader.dataset), _length(eval_dataloader.dataset))
            teachers = trainer.teachers
            if trainer.args.eval_teacher and len(teachers) and key not in self._teacher_knn:
                train_t, _ = self._summary_features(trainer, memory, teachers=True)
                test_t, _ = self._summary_features(trainer, eval_dataloader, teachers=True)
                names = ["teacher_knn_accuracy"] if len(train_t) == 1 else [
                    f"teacher_knn_accuracy_{k}" for k in teacher_keys([display_name(t) for t in teachers.models])]
                self._teacher_knn[key] = {n: knn_accuracy(a, train_y, b, test_y)
                                          for n, a, b in zip(names, train_t, test_t)}
            metrics.update(self._teacher_knn.get(key, {}))
        finally:
            container.train(was_training)
        return metrics
