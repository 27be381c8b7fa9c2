"""Every fenced Python and shell block of the README runs, in order, as written, so the README cannot drift.

Shell blocks run in bash, each line as written; a prelude of shell functions only shortens what would take too
long or cannot happen in a test, and says so:

* ``hf-distill`` commands get flags appended that cut a run short (``--max_steps 3``, fewer samples, two search
  trials, a two-epoch demo); a later flag overrides an earlier one, so the command line is otherwise the README's;
* ``torchrun`` / ``accelerate launch`` start 2 processes where the README says 8 (this machine has 2 cores), torchrun
  on a free port (``--standalone``);
* installing (``pip install -e ".[extra]"``) is checked, not done: the extras must exist in pyproject.toml and
  their packages be importable here; ``python3 -m venv`` creates the environment without pip (offline);
* ``python -m pytest`` collects the suite, in the repository (running it from inside itself would recurse);
* ``accelerate config`` writes accelerate's default config (the interactive questions need a person), in a
  sandboxed ``HF_HOME``.

Python blocks run as one script (later blocks use earlier names), with ``num_train_epochs=10`` -> ``max_steps=3``.
A push to the Hub goes to a local Hub server (``tests/hub_server.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = shutil.which("hf-distill", path=os.path.dirname(sys.executable)) or shutil.which("hf-distill")
SHORT = "--max_steps 3 --max_train_samples 128 --max_eval_samples 48"
PRELUDE = f"""
set -eo pipefail
hf-distill() {{
    case "$1" in
        demo) "$HF_DISTILL_CLI" "$@" --teacher_epochs 2 --student_epochs 2 --student_fraction 0.05 ;;
        layers) "$HF_DISTILL_CLI" "$@" ;;
        cache-teacher) "$HF_DISTILL_CLI" "$@" --max_train_samples 128 ;;
        search) "$HF_DISTILL_CLI" "$@" {SHORT} --n_trials 2 ;;
        *) "$HF_DISTILL_CLI" "$@" {SHORT} ;;
    esac
}}
torchrun() {{
    local args=(--standalone)  # a free rendezvous port: another torchrun on this machine may hold the default
    while [ $# -gt 0 ]; do
        if [ "$1" = "--nproc_per_node" ]; then args+=("$1" 2); shift 2; else args+=("$1"); shift; fi
    done
    "$HF_DISTILL_PYTHON" -m torch.distributed.run "${{args[@]}}" {SHORT} --per_device_train_batch_size 16
}}
accelerate() {{
    if [ "$1" = config ]; then "$HF_DISTILL_PYTHON" -m accelerate.commands.accelerate_cli config default;
    elif [ "$1" = launch ]; then shift; "$HF_DISTILL_PYTHON" -m accelerate.commands.accelerate_cli launch --cpu "$@" {SHORT};
    else "$HF_DISTILL_PYTHON" -m accelerate.commands.accelerate_cli "$@"; fi
}}
pip() {{ "$HF_DISTILL_PYTHON" "$HF_DISTILL_README_TEST" check-install "$@"; }}
python3() {{
    if [ "$1 $2" = "-m venv" ]; then command python3 -m venv --without-pip "${{@:3}}"; else command python3 "$@"; fi
}}
python() {{
    if [ "$1 $2" = "-m pytest" ]; then (cd "$HF_DISTILL_ROOT" && "$HF_DISTILL_PYTHON" -m pytest --collect-only -q "${{@:3}}");
    else "$HF_DISTILL_PYTHON" "$@"; fi
}}
"""
TIMEOUT = 900


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order (indented blocks of list items included)."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for indent, lang, body in re.findall(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        blocks.append((lang, "\n".join(line[len(indent):] for line in body.splitlines())))
    return blocks


def check_install(args: list[str]) -> None:
    """``pip install -e ".[a,b]"``: the extras exist in pyproject.toml and their requirements import here."""
    import importlib.util
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    assert args[:2] == ["install", "-e"], args
    m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", args[2])
    assert m, f"pip install -e {args[2]}: not this project"
    for extra in (m.group(1) or "").split(","):
        if extra:
            assert extra in extras, f"extra [{extra}] is not in pyproject.toml ({sorted(extras)})"
            for requirement in extras[extra]:
                name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
                module = {"scikit-learn": "sklearn", "pytest-xdist": "xdist"}.get(name, name.replace("-", "_"))
                assert importlib.util.find_spec(module), f"{requirement} (extra [{extra}]) is not installed"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", ws / "examples")
    return ws


def _bash(block: str, ws: Path, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "HF_DISTILL_CLI": CLI,
            "HF_DISTILL_PYTHON": sys.executable, "HF_DISTILL_README_TEST": __file__, "HF_DISTILL_ROOT": str(ROOT),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "HF_HOME": str(ws / "hf_home"), **env}  # accelerate's config is written there, not in ~/.cache
    full.pop("HF_DISTILL_TRACEBACK", None)
    return subprocess.run(["bash", "-c", PRELUDE + block], cwd=ws, env=full, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_every_readme_block_runs_in_order(ws):
    from hub_server import LocalHub

    blocks = readme_blocks()
    languages = {lang for lang, _ in blocks}
    assert languages <= {"bash", "python", ""}, languages  # "": the file tree, not code
    shell = [b for lang, b in blocks if lang == "bash"]
    python = [b for lang, b in blocks if lang == "python"]
    assert len(shell) >= 8 and len(python) >= 2
    token = "hf_" + "Rm4" * 12
    with LocalHub() as hub:
        for block in shell:
            env = {}
            if "--push_to_hub" in block:
                env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token}
            start = time.perf_counter()
            proc = _bash(block, ws, env)
            print(f"{time.perf_counter() - start:6.1f} s  {block.splitlines()[0][:90]}")  # where the minutes go (-s)
            assert proc.returncode == 0, f"{block}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            if block.startswith("python3 -m venv"):  # the demo: teacher, students and the card
                assert (ws / "hf_distill_demo" / "teacher" / "model.safetensors").exists()
                code = "\n".join(python)
                assert code.count("num_train_epochs=10") == 2
                code = code.replace("num_train_epochs=10", "max_steps=3")
                run = subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True,
                                     timeout=TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
                assert run.returncode == 0, run.stderr[-3000:]
                assert "'eval_accuracy'" in run.stdout and "'eval_teacher_accuracy'" in run.stdout
                assert (ws / "outputs" / "readme_kd_cached" / "checkpoint-3").exists()
            if "--push_to_hub" in block:
                files = hub.repos["me/resnet10t-digits-kd"]
                assert {"model.safetensors", "config.json", "README.md"} <= set(files)
                assert all(token.encode() not in data for data in files.values())
            if "pytest" in block:
                assert "test_readme.py" in proc.stdout and "test_cli_trust.py" in proc.stdout, proc.stdout[-2000:]
    for out in ("kd_cached", "features", "kd_cached_timm", "kd_ddp", "kd_torchrun", "kd_fsdp", "kd_search/best"):
        assert (ws / "outputs" / out / "model.safetensors").exists(), out


if __name__ == "__main__":  # the `pip` function of the prelude
    if sys.argv[1] == "check-install":
        check_install(sys.argv[2:])
