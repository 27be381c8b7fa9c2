"""The local fake Hub (tests/hub_server.py) answers real huggingface_hub client calls, offline."""

import json
import time

import pytest
import torch
from huggingface_hub import HfApi, create_repo, hf_hub_download, snapshot_download, upload_folder
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import save_file

from hub_server import LocalHub, local_hub, patched_endpoint

REPO = "local-org/tiny-student"


@pytest.fixture
def hub():
    with local_hub() as h:
        yield h


def _folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    (folder / "README.md").write_text("---\nlibrary_name: timm\ntags:\n- knowledge-distillation\n---\n\n# Tiny\n")
    return folder


def test_create_upload_list_download(hub, tmp_path):
    url = create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(hub.endpoint)
    # a second create_repo with exist_ok=True works; without it, a 409 surfaces
    assert create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        create_repo(REPO)
    assert err.value.response.status_code == 409

    folder = _folder(tmp_path)
    info = upload_folder(repo_id=REPO, folder_path=folder, commit_message="Add student")
    assert len(info.oid) == 40 and info.commit_url.startswith(hub.endpoint)
    assert set(hub.repos[REPO]) == {".gitattributes", "README.md", "config.json", "model.safetensors"}

    api = HfApi()
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    model = api.model_info(REPO)
    assert model.sha == info.oid and model.library_name == "timm" and "knowledge-distillation" in model.tags
    assert {s.rfilename for s in model.siblings} >= {"model.safetensors", "config.json"}

    cache = tmp_path / "cache"
    path = hf_hub_download(REPO, "model.safetensors", cache_dir=cache)
    assert open(path, "rb").read() == (folder / "model.safetensors").read_bytes()
    snap = snapshot_download(REPO, cache_dir=tmp_path / "cache2")
    assert json.load(open(f"{snap}/config.json"))["architecture"] == "resnet18"

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("local-org/nope", "config.json", cache_dir=cache)


def test_commit_history_and_delete(hub, tmp_path):
    first = hub.add_files(REPO, {"a/b.txt": b"one", "c.txt": b"two"})
    api = HfApi()
    api.upload_file(path_or_fileobj=b"three", path_in_repo="a/b.txt", repo_id=REPO)
    api.delete_file("c.txt", repo_id=REPO)
    assert hub.repos[REPO]["a/b.txt"] == b"three" and "c.txt" not in hub.repos[REPO]
    # old revisions stay downloadable by commit sha
    old = hf_hub_download(REPO, "a/b.txt", revision=first, cache_dir=tmp_path / "c")
    assert open(old, "rb").read() == b"one"
    tree = {f.path for f in api.list_repo_tree(REPO)}
    assert tree == {".gitattributes", "a"}


def test_failing_writes_raise_quickly():
    with LocalHub() as hub, patched_endpoint(hub.endpoint):
        hub.fail_writes = True
        start = time.monotonic()
        with pytest.raises(HfHubHTTPError) as err:
            create_repo(REPO)
        assert err.value.response.status_code == 500 and "fail_writes" in str(err.value)
        hub.fail_writes = False
        create_repo(REPO)
        hub.fail_writes, hub.fail_status = True, 403
        with pytest.raises(HfHubHTTPError):
            HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
        assert time.monotonic() - start < 10
        assert REPO in hub.repos and "x.txt" not in hub.repos[REPO]


def test_patched_endpoint_restores_and_blocks_other_hosts():
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import get_session

    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint)
    with LocalHub() as hub, patched_endpoint(hub.endpoint):
        assert constants.ENDPOINT == hub.endpoint == hf_api.api.endpoint
        with pytest.raises(Exception, match="blocked"):
            get_session().get("https://huggingface.co/api/models/gpt2")
    assert (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint) == before
    with pytest.raises(ValueError):
        with patched_endpoint("https://huggingface.co"):
            pass
