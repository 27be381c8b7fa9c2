"""Model cards for distilled students: metadata the Hub understands plus a readable report.

:func:`build_model_card` fills ``distilled_model_card.md`` (a Jinja template for
``huggingface_hub.ModelCard.from_template``) from a :class:`CardContext`: what was distilled
from what with which method, every hyperparameter, student-vs-teacher results, parameter
counts and measured inference time, a usage snippet for the student's library, the training
procedure and framework versions. Anything that looks like a Hugging Face token is removed.

- :mod:`.context`: :class:`CardContext` (what a card reports), secret scrubbing, Hub ids, the template
- :mod:`.records`: what a run measured for its card (:func:`measure_latency_ms`, :func:`run_record`)
- :mod:`.tables`: the results, size and timing tables, and how values are written in them
- :mod:`.usage`: the usage snippet for the student's library
- :mod:`.render`: the card's metadata and :func:`build_model_card`
"""

from .context import TEMPLATE_NAME, CardContext, framework_versions, hub_repo_id, scrub_secrets, template_path
from .records import measure_latency_ms, run_record
from .render import build_model_card


__all__ = [
    "CardContext",
    "build_model_card",
    "framework_versions",
    "hub_repo_id",
    "measure_latency_ms",
    "scrub_secrets",
    "template_path",
    "TEMPLATE_NAME",
    "run_record",
]
