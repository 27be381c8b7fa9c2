"""What a model card reports (:class:`CardContext`), and the small helpers every part of it uses:
secrets scrubbed, Hub repo ids, the card template, framework versions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


TEMPLATE_NAME = "distilled_model_card.md"

# Licence identifiers the Hub accepts in the ``license`` field (others become ``license: other``).
_HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c
    ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib
    pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
    llama3.3 llama4 gemma unknown other""".split()
)

_TOKEN_RE = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,})")
_SECRET_KEY_RE = re.compile(r"(token$|secret|password|passwd|api_?key|credential)", re.I)
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BARE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LOCAL_DATASETS = {"sklearn-digits", "imagefolder"}
REDACTED = "<redacted>"


@dataclass
class CardContext:
    """Everything the card reports; only the first four fields are required."""

    student_name: str  # e.g. "resnet18" or "my-org/student"
    library_name: str  # "timm" | "transformers" | "torch"
    student_params: int
    method: str  # "kd", "fitnets", "byot", "sftn", "noisy_teacher", "supervised", ...
    teacher_names: list[str] = field(default_factory=list)  # Hub ids, local paths or architecture names
    teacher_params: list[int] = field(default_factory=list)
    method_paper: tuple[str, str] | None = None  # (title, url)
    hyperparameters: dict = field(default_factory=dict)  # every distillation hyperparameter
    metrics: dict[str, float] = field(default_factory=dict)  # eval metrics without the "eval_" prefix
    dataset: str | None = None  # dataset name (Hub id when it is one)
    license: str | None = None
    training: dict = field(default_factory=dict)  # epochs, train_batch_size, optimizer, learning_rate, ...
    timing: dict = field(default_factory=dict)  # student_ms_per_image, teacher_ms_per_image, device, ...
    label_names: list[str] | None = None
    repo_id: str | None = None  # where the card will be pushed (for the usage snippet)
    image_size: tuple[int, int] | None = None
    in_chans: int = 3
    notes: dict[str, str] = field(default_factory=dict)  # extra facts, rendered as a list
    task: str = "image-classification"  # or "image-feature-extraction" (a feature-distilled backbone)
    # what the method declares (hf_distill.methods): its human name, one sentence, the kind of each metric
    # (regex over metric names -> accuracy / knn / cosine / agreement / divergence); default: the registry's
    method_title: str | None = None
    method_description: str | None = None
    metric_kinds: dict[str, str] | None = None
    eval_split: str | None = None  # the evaluation split's name ("test"), when known
    eval_size: int | None = None  # how many images it holds
    eval_held_out: bool = False  # the evaluation images are a held-out part of the split named eval_split
    preprocessing: str | None = None  # how the evaluation images were preprocessed, in words
    teacher_measurement: str | None = None  # how the teacher's accuracy was measured, in words
    teacher_keys: dict[str, str] = field(default_factory=dict)  # teacher key in metric names -> teacher name
    teacher_cache: str | None = None  # where cached teacher outputs came from, in words


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def scrub_secrets(text: str) -> str:
    """Remove anything that looks like a Hugging Face access token (``hf_...``, ``api_org_...``)."""
    return _TOKEN_RE.sub(REDACTED, text)


def hub_repo_id(name: str | None) -> str | None:
    """``org/name`` when ``name`` looks like a Hub model repo id (``hf-hub:`` prefix allowed), else ``None``.

    Local paths (existing, absolute, relative with ``./``/``~``, ``local-dir:``) and bare
    architecture names (``resnet50``) are not repo ids.
    """
    if not name:
        return None
    name = str(name).strip()
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        if os.path.exists(name):
            return None
    name = name.split("@", 1)[0]  # a pinned revision is not part of the id
    if ".." in name or not _REPO_ID_RE.match(name):
        return None
    return name


def _hub_dataset_id(name: str | None) -> str | None:
    """A dataset name usable in ``datasets:`` metadata: ``org/name`` or a legacy bare name, not a local path."""
    if not name or name in _LOCAL_DATASETS or os.path.exists(name):
        return None
    if ".." in name:
        return None
    return name if (_REPO_ID_RE.match(name) or _BARE_NAME_RE.match(name)) else None


def template_path() -> str:
    """The card template: packaged ``hf_distill/templates/`` first, else ``<repo>/model_cards/``."""
    try:
        resource = importlib.resources.files("hf_distill").joinpath("templates", TEMPLATE_NAME)
        if resource.is_file():
            return str(resource)
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    path = Path(__file__).resolve().parent.parent.parent / "model_cards" / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {TEMPLATE_NAME} not found (looked in hf_distill/templates and {path.parent})"
        )
    return str(path)


def framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a distilled model depends on (missing ones are left out)."""
    versions = {}
    for label, dists in (
        ("hf_distill", ("hf_distill", "hf-distill")),
        ("torch", ("torch",)),
        ("timm", ("timm",)),
        ("transformers", ("transformers",)),
        ("accelerate", ("accelerate",)),
        ("datasets", ("datasets",)),
        ("huggingface_hub", ("huggingface_hub", "huggingface-hub")),
    ):
        for dist in dists:
            try:
                versions[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    if "hf_distill" not in versions:
        try:
            from .. import __version__

            versions["hf_distill"] = __version__
        except ImportError:  # pragma: no cover
            pass
    return versions
