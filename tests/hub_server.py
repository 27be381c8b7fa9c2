"""A small in-memory fake of the Hugging Face Hub HTTP API, for offline tests.

It serves, on ``127.0.0.1`` only, what ``huggingface_hub`` (2.x, httpx-based) calls for
``create_repo``, ``upload_folder``/``upload_file``/``create_commit`` (regular uploads: every
file is answered ``uploadMode: regular``, so neither LFS nor Xet is ever used),
``ModelCard.validate``/``push_to_hub``, ``model_info``/``repo_info``/``list_repo_files``/
``list_repo_tree``, ``hf_hub_download`` and ``snapshot_download``.

Usage::

    with LocalHub() as hub, patched_endpoint(hub.endpoint):
        huggingface_hub.create_repo("org/name")
        ...
    hub.repos["org/name"]  # {path: bytes} of the current ``main``

``hub.fail_writes = True`` answers every write (POST/PUT/DELETE) with ``hub.fail_status``
(500 by default). The client does not retry 500 on ``/api/repos/create`` or ``/commit``;
it does retry it (with backoff) on ``/preupload``, so for a fast failure there set
``fail_status = 403``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_API = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)?)"
                  r"(?:/(?P<verb>preupload|commit|tree|revision)/(?P<rev>[^/]+)(?:/(?P<sub>.*))?)?$")
_RESOLVE = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class LocalHub:
    """In-memory Hub. ``repos``: repo key (``org/name``; ``datasets/org/name`` for datasets) -> {path: bytes}."""

    def __init__(self, timeout: float = 10.0):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.history: dict[str, list[tuple[str, dict[str, bytes], str]]] = {}  # key -> [(sha, files, summary)]
        self.requests: list[tuple[str, str]] = []  # (method, path) log
        self.fail_writes = False
        self.fail_status = 500
        self.timeout = timeout
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub, Handler.timeout = hub, self.timeout
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- state -----------------------------------------------------------------------------
    @staticmethod
    def key(repo_id: str, repo_type: str | None = "model") -> str:
        return repo_id if repo_type in (None, "model", "models") else f"{repo_type.rstrip('s')}s/{repo_id}"

    def create(self, repo_id: str, repo_type: str | None = "model") -> str:
        with self._lock:
            k = self.key(repo_id, repo_type)
            if k not in self.repos:
                self._commit(k, {".gitattributes": GITATTRIBUTES}, "initial commit", base={})
            return k

    def add_files(self, repo_id: str, files: dict[str, bytes], repo_type: str | None = "model", message: str = "seed") -> str:
        """Seed a repo (created if missing) with files in one commit; returns the commit sha."""
        k = self.create(repo_id, repo_type)
        with self._lock:
            return self._commit(k, dict(files), message)

    def head(self, k: str) -> str:
        return self.history[k][-1][0]

    def _commit(self, k: str, changes: dict[str, bytes | None], summary: str, base: dict | None = None) -> str:
        files = dict(self.repos.get(k, {}) if base is None else base)
        for path, data in changes.items():
            if data is None:  # deletion (a folder when the path ends with "/")
                for p in [p for p in files if p == path or (path.endswith("/") and p.startswith(path))]:
                    del files[p]
            else:
                files[path] = data
        n = len(self.history.get(k, []))
        sha = hashlib.sha1(f"{k}:{n}:{summary}".encode() + json.dumps(sorted(files)).encode()).hexdigest()
        self.repos[k] = files
        self.history.setdefault(k, []).append((sha, files, summary))
        return sha

    def _snapshot(self, k: str, rev: str) -> tuple[str, dict[str, bytes]]:
        if k not in self.repos:
            raise HubError(404, f"Repository {k} not found", "RepoNotFound")
        if rev in ("main", "HEAD"):
            return self.head(k), self.repos[k]
        for sha, files, _ in reversed(self.history[k]):
            if len(rev) >= 7 and sha.startswith(rev):
                return sha, files
        raise HubError(404, f"Revision {rev} not found", "RevisionNotFound")

    # ---- request handling (called from handler threads) ------------------------------------
    def handle(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict, bytes | dict | list]:
        if method in ("POST", "PUT", "DELETE") and self.fail_writes:
            raise HubError(self.fail_status, "LocalHub: writes are failing (fail_writes=True)")
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/repos/delete" and method == "POST":
            req = json.loads(body or b"{}")
            repo_id = "/".join(x for x in (req.get("organization"), req["name"]) if x)
            with self._lock:
                k = self.key(repo_id, req.get("type"))
                if self.repos.pop(k, None) is None:
                    raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
                self.history.pop(k, None)
            return 200, {}, {}
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path == "/api/whoami-v2" and method == "GET":
            return 200, {}, {"type": "user", "name": "local-user", "orgs": [], "auth": {}}
        m = _API.match(path)
        if m:
            repo_type, repo_id, verb = m["type"], m["repo"], m["verb"]
            rev = unquote(m["rev"] or "main")
            k = self.key(repo_id, repo_type)
            with self._lock:
                if verb is None or verb == "revision":
                    if method == "GET":
                        return self._info(repo_id, k, rev)
                elif verb == "tree" and method == "GET":
                    recursive = str(query.get("recursive", ["false"])[0]).lower() in ("1", "true")
                    return self._tree(k, rev, unquote(m["sub"] or "").strip("/"), recursive)
                elif verb == "preupload" and method == "POST":
                    self._snapshot(k, rev)
                    files = json.loads(body)["files"]
                    return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]}
                elif verb == "commit" and method == "POST":
                    return self._commit_ndjson(repo_type, repo_id, k, rev, body)
        m = _RESOLVE.match(path)
        if m and method in ("GET", "HEAD"):
            with self._lock:
                sha, files = self._snapshot(self.key(m["repo"], m["type"]), unquote(m["rev"]))
            name = unquote(m["file"])
            if name not in files:
                raise HubError(404, f"Entry {name} not found", "EntryNotFound", {"X-Repo-Commit": sha})
            data = files[name]
            return 200, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"',
                         "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}, data
        raise HubError(404, f"LocalHub: no route for {method} {path}")

    def _create_repo(self, req: dict):
        repo_id = "/".join(x for x in (req.get("organization"), req["name"]) if x)
        repo_type = req.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        with self._lock:
            if self.key(repo_id, repo_type) in self.repos:
                raise HubError(409, "You already created this model repo", None, {"url": url})
        self.create(repo_id, repo_type)
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def _validate_yaml(self, req: dict):
        content = req.get("content", "")
        if not content.startswith("---"):
            return 200, {}, {"warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}
        parts = re.split(r"^---\s*$", content, maxsplit=2, flags=re.M)
        try:
            meta = yaml.safe_load(parts[1]) if len(parts) >= 3 else None
            if meta is not None and not isinstance(meta, dict):
                raise yaml.YAMLError("metadata must be a YAML mapping")
        except yaml.YAMLError as err:
            msg = f"Invalid YAML metadata: {err}"
            return 400, {}, {"error": msg, "errors": [{"message": msg}]}
        errors = []
        for entry in (meta or {}).get("model-index") or []:
            for res in entry.get("results", []) if isinstance(entry, dict) else [None]:
                if not (isinstance(res, dict) and "task" in res and "dataset" in res and "metrics" in res):
                    errors.append({"message": f'"model-index" result must have task, dataset and metrics: {res!r}'})
        if errors:
            return 400, {}, {"error": errors[0]["message"], "errors": errors}
        return 200, {}, {}

    def _info(self, repo_id: str, k: str, rev: str):
        sha, files = self._snapshot(k, rev)
        info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "disabled": False, "tags": [],
                "lastModified": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "siblings": [{"rfilename": p, "size": len(d), "blobId": git_blob_oid(d)} for p, d in sorted(files.items())]}
        readme = files.get("README.md", b"").decode("utf-8", "replace")
        parts = re.split(r"^---\s*$", readme, maxsplit=2, flags=re.M)
        if readme.startswith("---") and len(parts) >= 3:
            with contextlib.suppress(yaml.YAMLError):
                card = yaml.safe_load(parts[1]) or {}
                if isinstance(card, dict):
                    info["cardData"] = card
                    info.update({x: card[x] for x in ("library_name", "pipeline_tag") if x in card})
                    info["tags"] = list(card.get("tags") or [])
        return 200, {}, info

    def _tree(self, k: str, rev: str, sub: str, recursive: bool):
        _, files = self._snapshot(k, rev)
        prefix = f"{sub}/" if sub else ""
        if sub and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Entry {sub} not found", "EntryNotFound")
        out, dirs = [], set()
        for p, d in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            for i in range(1, len(rest) if recursive else min(2, len(rest))):
                dirs.add(prefix + "/".join(rest[:i]))
            if recursive or len(rest) == 1:
                out.append({"type": "file", "path": p, "size": len(d), "oid": git_blob_oid(d)})
        out += [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        return 200, {}, out

    def _commit_ndjson(self, repo_type: str, repo_id: str, k: str, rev: str, body: bytes):
        if rev not in ("main", "HEAD"):
            raise HubError(400, f"LocalHub only commits to main, not {rev}")
        self._snapshot(k, rev)
        changes: dict[str, bytes | None] = {}
        summary = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary") or summary
            elif key == "file":
                raw = value["content"]
                changes[value["path"]] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"].rstrip("/") + ("/" if key == "deletedFolder" else "")] = None
            else:
                raise HubError(400, f"LocalHub does not support commit operation {key!r} (LFS)")
        sha = self._commit(k, changes, summary)
        prefix = "" if repo_type == "models" else f"{repo_type}/"
        return 200, {}, {"commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None, "success": True}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub
    timeout = 10.0

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        self.hub.requests.append((method, url.path))
        try:
            status, headers, payload = self.hub.handle(method, url.path, parse_qs(url.query), body)
        except HubError as err:
            status, payload = err.status, {"error": err.message, **err.extra}
            headers = {k: v for k, v in err.extra.items() if k.startswith("X-")}
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
        except Exception as err:  # a bug in the fake: report it instead of hanging the client
            status, headers, payload = 500, {"X-Error-Message": repr(err)}, {"error": repr(err)}
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if status == 200 and rng and "ETag" in headers:
            start, end = int(rng[1]), int(rng[2]) if rng[2] else len(payload) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(payload)}"
            status, payload = 206, payload[start:end + 1]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")


@contextlib.contextmanager
def patched_endpoint(endpoint: str, timeout: float = 20.0):
    """Point huggingface_hub (and transformers/datasets when imported) at ``endpoint``; restore on exit.

    Also: disables offline mode and Xet while active, and swaps huggingface_hub's HTTP client
    for one with ``timeout`` that refuses any host other than 127.0.0.1/localhost.
    """
    import httpx2
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    if urlsplit(endpoint).hostname not in _LOCAL_HOSTS:
        raise ValueError(f"patched_endpoint only accepts local endpoints, got {endpoint}")
    saved: list[tuple[object, str, object]] = []

    def setattr_(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def guard(request):
        if request.url.host not in _LOCAL_HOSTS:
            raise httpx2.ConnectError(f"LocalHub: blocked a request to {request.url} (tests stay on 127.0.0.1)")
        return _http.hf_request_event_hook(request)

    def client_factory():
        return httpx2.Client(event_hooks={"request": [guard]}, follow_redirects=True, timeout=timeout)

    saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET")}
    saved_factory = _http._GLOBAL_CLIENT_FACTORY
    try:
        os.environ.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HUB_DISABLE_XET="1")
        setattr_(constants, "ENDPOINT", endpoint)
        setattr_(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        setattr_(constants, "HF_HUB_OFFLINE", False)
        setattr_(constants, "HF_HUB_DISABLE_XET", True)
        setattr_(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname}))
        setattr_(hf_api.api, "endpoint", endpoint)
        if "transformers.utils.hub" in sys.modules:
            setattr_(sys.modules["transformers.utils.hub"], "_hf_api", None)
        if "datasets.config" in sys.modules:
            cfg = sys.modules["datasets.config"]
            setattr_(cfg, "HF_ENDPOINT", endpoint)
            setattr_(cfg, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
            setattr_(cfg, "HF_HUB_OFFLINE", False)
        _http.set_client_factory(client_factory)
        yield endpoint
    finally:
        _http.set_client_factory(saved_factory)
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_hub(timeout: float = 10.0):
    """``LocalHub`` started and huggingface_hub pointed at it (the lead can wrap this in a fixture)."""
    with LocalHub(timeout=timeout) as hub, patched_endpoint(hub.endpoint):
        yield hub
