"""A small Hugging Face Hub-compatible HTTP server for the test suite (stdlib only).

Lets tests run the REAL ``huggingface_hub`` client (and diffusers/transformers on top of it) offline. Repos live
under ``{root}/{models|datasets|spaces}/{ns}/{name}/``: ``repo.json`` (private flag, refs), ``commits/{sha}.json``
(full file table per commit, so any commit sha is a revision) and ``objects/{git-sha1 | lfs-sha256}`` (contents).
``huggingface_hub`` reads ``HF_ENDPOINT`` at import time and uploads via Xet when ``hf_xet`` is installed: set
``HF_ENDPOINT=<endpoint>`` and ``HF_HUB_DISABLE_XET=1`` BEFORE importing it (hence :func:`free_port`; see conftest).

Endpoints (``{t}``: models|datasets|spaces; repo ids are ``namespace/name``; ``{rev}``: branch, tag, URL-quoted ref
such as ``refs%2Fpr%2F1``, or commit sha):
  GET      /api/whoami-v2                           any token (or none) -> user "user"
  GET      /api/agent-harnesses                     empty registry (fetched by the client's user-agent code)
  POST     /api/repos/create                        409 + {"url"} when it exists (what ``exist_ok`` relies on)
  POST     /api/validate-yaml                       always valid (called when a commit touches README.md)
  GET      /api/{t}/{repo}[/revision/{rev}]         repo/model info: sha, private, siblings (size, blobId, lfs)
  GET      /api/{t}/{repo}/tree/{rev}[/{path}]      ?recursive=true (list_repo_files/_tree, snapshot_download)
  POST     /api/{t}/{repo}/paths-info/{rev}         form-encoded ``paths``
  GET      /api/{t}/{repo}/refs                     branches, tags, pullRequests
  POST     /api/{t}/{repo}/preupload/{rev}          uploadMode "lfs" for LFS_SUFFIXES or > LFS_THRESHOLD bytes
  POST     /api/{t}/{repo}/commit/{rev}             x-ndjson header/file/lfsFile/deletedFile/deletedFolder lines;
                                                    ?create_pr=1 -> new ref refs/pr/N (the branch is unchanged)
  POST     /[{t}/]{repo}.git/info/lfs/objects/batch LFS batch API (upload); actions point back at this server
  PUT      /lfs-objects/{t}/{repo}/{oid}            LFS object upload (sha256 checked; chunked bodies accepted)
  POST     /lfs-verify/{t}/{repo}/{oid}             LFS verify
  HEAD/GET /[{t}/]{repo}/resolve/{rev}/{path}       X-Repo-Commit, ETag (git oid), for LFS files X-Linked-Etag
                                                    (sha256) + X-Linked-Size; Content-Length; Range
Missing repo/revision/file: 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`` (mapped by
``hf_raise_for_status`` to ``RepositoryNotFoundError`` etc.). Private repos are only flagged (no auth check).

``fail_next(substring, status, count)`` fails the next requests whose raw path contains ``substring``. The client
retries 408/429/5xx with backoff (1s, 2s, 4s, ...) on preupload, LFS batch/PUT/verify and resolve (HEAD retried
once): only ``/commit/`` is not retried. To fail the others fast, use a non-retried status such as 403.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HTTPError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


_T, _R = r"(?P<t>models|datasets|spaces)", r"(?P<repo>[^/]+/[^/]+)"
_OT = r"(?:(?P<t>datasets|spaces)/)?"  # optional type prefix of git-style urls (models have none)
_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),  # fetched by the client's user-agent code
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/{_T}/{_R}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", rf"/api/{_T}/{_R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/{_T}/{_R}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", rf"/api/{_T}/{_R}/refs", "refs"),
    ("POST", rf"/api/{_T}/{_R}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/{_T}/{_R}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/{_OT}{_R}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/lfs-objects/{_T}/{_R}/(?P<oid>[0-9a-f]{{64}})", "lfs_put"),
    ("POST", rf"/lfs-verify/{_T}/{_R}/(?P<oid>[0-9a-f]{{64}})", "lfs_verify"),
    ("GET|HEAD", rf"/{_OT}{_R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
_ROUTES = [(methods.split("|"), re.compile(rx), name) for methods, rx, name in _ROUTES]


class LocalHubServer:
    """Hub-compatible server on a background thread. Inspect state with :meth:`file_info`, :meth:`ref`,
    ``requests`` (list of ``(method, raw_path)``) and ``lfs_uploads`` (list of ``(repo_id, sha256)``)."""

    LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5", ".gguf")
    LFS_THRESHOLD = 10 * 1024 * 1024
    USER = "user"

    def __init__(self, root: str, host: str = "127.0.0.1", port: int = 0):
        self.root, self.host, self.port = Path(root), host, port
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str]] = []
        self.lfs_uploads: list[tuple[str, str]] = []
        self._failures: list[list] = []  # [substring, status, remaining, method]
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "LocalHubServer":
        self._httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name="local-hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, path_substring: str, status: int = 500, count: int = 1, method: str | None = None) -> None:
        """Make the next ``count`` requests whose raw path (with query) contains ``path_substring`` fail."""
        with self._lock:
            self._failures.append([path_substring, status, count, method])

    def _take_failure(self, method: str, raw_path: str) -> int | None:
        with self._lock:
            for rule in self._failures:
                if rule[0] in raw_path and rule[3] in (None, method):
                    rule[2] -= 1
                    if rule[2] <= 0:
                        self._failures.remove(rule)
                    return rule[1]
        return None

    def file_info(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> dict | None:
        """Entry ``{"size", "blob", "lfs" (sha256 or None), "pointer_size"}`` of a file, or None."""
        try:
            return self._files(repo_type + "s", repo_id, revision)[1].get(path)
        except _HTTPError:
            return None

    def ref(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str | None:
        """Commit sha a revision points to, or None."""
        try:
            return self._resolve(repo_type + "s", repo_id, revision)[0]
        except _HTTPError:
            return None

    def _dir(self, t: str, repo: str) -> Path:
        return self.root / t / repo

    def _url(self, t: str, repo: str) -> str:
        return f"{self.endpoint}/{'' if t == 'models' else t + '/'}{repo}"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: concurrent readers never see partial files

    def _meta(self, t: str, repo: str) -> dict:
        path = self._dir(t, repo) / "repo.json"
        if not path.is_file():
            raise _HTTPError(404, "RepoNotFound", f"Repository not found: {repo}")
        return json.loads(path.read_text())

    def _resolve(self, t: str, repo: str, rev: str) -> tuple[str, dict]:
        meta = self._meta(t, repo)
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref in meta["refs"]:
                return meta["refs"][ref], meta
        if re.fullmatch(r"[0-9a-f]{40}", rev) and (self._dir(t, repo) / "commits" / f"{rev}.json").is_file():
            return rev, meta
        raise _HTTPError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _commit_data(self, t: str, repo: str, sha: str) -> dict:
        return json.loads((self._dir(t, repo) / "commits" / f"{sha}.json").read_text())

    def _files(self, t: str, repo: str, rev: str) -> tuple[str, dict]:
        sha, _ = self._resolve(t, repo, rev)
        return sha, self._commit_data(t, repo, sha)["files"]

    def _new_commit(self, t: str, repo: str, parent: str | None, files: dict, title: str, desc: str = "") -> str:
        self._counter += 1
        data = {"parent": parent, "title": title, "description": desc, "date": time.time(), "files": files}
        sha = hashlib.sha1(json.dumps([data, self._counter], sort_keys=True).encode()).hexdigest()
        self._write(self._dir(t, repo) / "commits" / f"{sha}.json", json.dumps(data).encode())
        return sha

    def _add_regular(self, t: str, repo: str, content: bytes) -> dict:
        blob = git_blob_sha1(content)
        self._write(self._dir(t, repo) / "objects" / blob, content)
        return {"size": len(content), "blob": blob, "lfs": None, "pointer_size": None}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _tree_entry(path: str, e: dict | None) -> dict:
    if e is None:  # folder
        return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0}
    out = {"type": "file", "path": path, "oid": e["blob"], "size": e["size"]}
    if e["lfs"]:
        out["lfs"] = {"oid": e["lfs"], "size": e["size"], "pointerSize": e["pointer_size"]}
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries a Content-Length

    def log_message(self, *args):  # keep pytest output clean
        pass

    @property
    def hub(self) -> LocalHubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # httpx2 streams file objects
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body=b"", headers: dict | None = None, ctype: str = "application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self):
        body = self._read_body()  # always consume the body, so keep-alive connections stay in sync
        split = urlsplit(self.path)
        self.hub.requests.append((self.command, self.path))
        try:
            status = self.hub._take_failure(self.command, self.path)
            if status is not None:
                raise _HTTPError(status, None, f"Injected failure ({status}) for {self.command} {split.path}")
            for methods, rx, name in _ROUTES:
                match = rx.fullmatch(split.path) if self.command in methods else None
                if match:
                    groups = {k: (unquote(v) if v is not None else None) for k, v in match.groupdict().items()}
                    groups["t"] = groups.get("t") or "models"
                    return getattr(self, "h_" + name)(groups, body, parse_qs(split.query))
            raise _HTTPError(404, None, f"No route for {self.command} {split.path}")
        except Exception as exc:  # a server bug / malformed request is reported, not a dropped connection
            err = exc if isinstance(exc, _HTTPError) else _HTTPError(500, None, f"Server error: {exc!r}")
            message = err.message.encode("ascii", "replace").decode().replace("\n", " ")  # header-safe
            headers = {"X-Error-Message": message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def h_whoami(self, g, body, q):
        self._send(200, {"type": "user", "id": "0", "name": self.hub.USER, "fullname": "Test User", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def h_agent_harnesses(self, g, body, q):
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def h_validate_yaml(self, g, body, q):
        self._send(200, {"errors": [], "warnings": []})

    def h_create_repo(self, g, body, q):
        payload = json.loads(body or b"{}")
        t = (payload.get("type") or "model") + "s"
        repo = f"{payload.get('organization') or self.hub.USER}/{payload['name']}"
        with self.hub._lock:
            if (self.hub._dir(t, repo) / "repo.json").is_file():
                return self._send(409, {"error": "You already created this repo", "url": self.hub._url(t, repo)})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            files = {".gitattributes": self.hub._add_regular(t, repo, GITATTRIBUTES)}
            sha = self.hub._new_commit(t, repo, None, files, "initial commit")
            meta = {"private": private, "created": time.time(), "prs": 0, "refs": {"refs/heads/main": sha}}
            self.hub._write(self.hub._dir(t, repo) / "repo.json", json.dumps(meta).encode())
        self._send(200, {"url": self.hub._url(t, repo), "name": repo, "id": repo})

    def h_delete_repo(self, g, body, q):
        payload = json.loads(body or b"{}")
        t = (payload.get("type") or "model") + "s"
        repo = f"{payload.get('organization') or self.hub.USER}/{payload['name']}"
        with self.hub._lock:
            folder = self.hub._dir(t, repo)
            if not (folder / "repo.json").is_file():
                raise _HTTPError(404, "RepoNotFound", f"Repository {repo} not found")
            shutil.rmtree(folder)
        self._send(200, {})

    def h_repo_info(self, g, body, q):
        t, repo = g["t"], g["repo"]
        sha, meta = self.hub._resolve(t, repo, g["rev"] or "main")
        commit = self.hub._commit_data(t, repo, sha)
        siblings = []
        for path, e in sorted(commit["files"].items()):
            sib = {"rfilename": path, "size": e["size"], "blobId": e["blob"]}
            if e["lfs"]:
                sib["lfs"] = {"sha256": e["lfs"], "size": e["size"], "pointerSize": e["pointer_size"]}
            siblings.append(sib)
        self._send(200, {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                         "private": meta["private"], "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                         "tags": [], "createdAt": _iso(meta["created"]), "lastModified": _iso(commit["date"]),
                         "siblings": siblings})

    def h_tree(self, g, body, q):
        _, files = self.hub._files(g["t"], g["repo"], g["rev"])
        prefix = (g["path"] or "").strip("/")
        recursive = q.get("recursive", ["false"])[0].lower() in ("1", "true")
        if prefix and prefix in files:
            raise _HTTPError(404, "EntryNotFound", f"{prefix} is a file, not a folder")
        base = prefix + "/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, e in files.items():
            if path.startswith(base):
                parts = path.split("/")
                for i in range(base.count("/") + 1, len(parts)):  # folders between `prefix` and the file
                    entries["/".join(parts[:i])] = _tree_entry("/".join(parts[:i]), None)
                entries[path] = _tree_entry(path, e)
        if not recursive:  # direct children only
            entries = {p: e for p, e in entries.items() if p.count("/") == base.count("/")}
        if prefix and not entries:
            raise _HTTPError(404, "EntryNotFound", f"{prefix} does not exist")
        self._send(200, [entries[k] for k in sorted(entries)])

    def h_paths_info(self, g, body, q):
        _, files = self.hub._files(g["t"], g["repo"], g["rev"])
        out = []
        for path in parse_qs(body.decode()).get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(_tree_entry(path, files[path]))
            elif any(f.startswith(path + "/") for f in files):
                out.append(_tree_entry(path, None))
        self._send(200, out)

    def h_refs(self, g, body, q):
        refs = sorted(self.hub._meta(g["t"], g["repo"])["refs"].items())
        out = {"converts": []}
        for key, prefix in (("branches", "refs/heads/"), ("tags", "refs/tags/"), ("pullRequests", "refs/pr/")):
            out[key] = [{"name": r if key == "pullRequests" else r[len(prefix):], "ref": r, "targetCommit": sha}
                        for r, sha in refs if r.startswith(prefix)]
        self._send(200, out)

    def h_preupload(self, g, body, q):
        sha, files = self.hub._files(g["t"], g["repo"], g["rev"])
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(self.hub.LFS_SUFFIXES) or f["size"] > self.hub.LFS_THRESHOLD
            existing = files.get(f["path"])
            oid = (existing["lfs"] or existing["blob"]) if existing else None
            mode = "lfs" if lfs else "regular"
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out, "commitOid": sha})

    def h_lfs_batch(self, g, body, q):
        t, repo = g["t"], g["repo"]
        self.hub._meta(t, repo)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise _HTTPError(400, None, "Only the 'upload' LFS operation is supported")
        objects = []
        for obj in payload["objects"]:
            out = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            stored = self.hub._dir(t, repo) / "objects" / obj["oid"]
            if not (stored.is_file() and stored.stat().st_size == obj["size"]):  # else: already there, no actions
                out["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-objects/{t}/{repo}/{obj['oid']}"},
                                  "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{t}/{repo}/{obj['oid']}"}}
            objects.append(out)
        self._send(200, {"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

    def h_lfs_put(self, g, body, q):
        t, repo, oid = g["t"], g["repo"], g["oid"]
        self.hub._meta(t, repo)
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HTTPError(400, None, f"LFS object content does not match its oid {oid}")
        self.hub._write(self.hub._dir(t, repo) / "objects" / oid, body)
        self.hub.lfs_uploads.append((repo, oid))
        self._send(200, {})

    def h_lfs_verify(self, g, body, q):
        stored = self.hub._dir(g["t"], g["repo"]) / "objects" / g["oid"]
        if not stored.is_file() or stored.stat().st_size != json.loads(body).get("size"):
            raise _HTTPError(404, None, f"LFS object {g['oid']} not found or has the wrong size")
        self._send(200, {"success": True})

    def h_commit(self, g, body, q):
        t, repo, rev = g["t"], g["repo"], g["rev"]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        create_pr = q.get("create_pr", ["0"])[0] in ("1", "true")
        hub = self.hub
        with hub._lock:
            head, meta = hub._resolve(t, repo, rev)
            ref = rev if rev in meta["refs"] else f"refs/heads/{rev}"
            if ref not in meta["refs"] and not create_pr:
                raise _HTTPError(400, None, f"Cannot commit to '{rev}': not a branch or pull request ref")
            if header.get("parentCommit") not in (None, head):
                raise _HTTPError(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(hub._commit_data(t, repo, head)["files"])
            for line in lines:
                key, value = line["key"], line["value"]
                path = value.get("path", "").strip("/") if isinstance(value, dict) else ""
                if key == "file":
                    files[path] = hub._add_regular(t, repo, base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    stored = hub._dir(t, repo) / "objects" / value["oid"]
                    if not stored.is_file():
                        raise _HTTPError(422, None, f"LFS object {value['oid']} for {path} was never uploaded")
                    size = stored.stat().st_size
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {size}\n"
                    files[path] = {"size": size, "blob": git_blob_sha1(pointer.encode()), "lfs": value["oid"],
                                   "pointer_size": len(pointer)}
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HTTPError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path + "/")}
                elif key != "header":
                    raise _HTTPError(400, None, f"Unsupported commit operation: {key}")
            sha = hub._new_commit(t, repo, head, files, header.get("summary", ""), header.get("description", ""))
            pr_url = None
            if create_pr:
                meta["prs"] += 1
                ref = f"refs/pr/{meta['prs']}"
                pr_url = f"{hub._url(t, repo)}/discussions/{meta['prs']}"
            meta["refs"][ref] = sha
            hub._write(hub._dir(t, repo) / "repo.json", json.dumps(meta).encode())
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{hub._url(t, repo)}/commit/{sha}",
                         "commitMessage": header.get("summary", ""), "hookOutput": "", "pullRequestUrl": pr_url})

    def h_resolve(self, g, body, q):
        t, repo, path = g["t"], g["repo"], g["path"]
        sha, files = self.hub._files(t, repo, g["rev"])
        entry = files.get(path)
        if entry is None:
            raise _HTTPError(404, "EntryNotFound", f"{path} does not exist at {g['rev']}", {"X-Repo-Commit": sha})
        data = (self.hub._dir(t, repo) / "objects" / (entry["lfs"] or entry["blob"])).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["blob"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]}"', "X-Linked-Size": str(entry["size"])})
        status = 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start, end = int(rng[1]), int(rng[2]) if rng[2] else len(data) - 1
            if start >= len(data):
                raise _HTTPError(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data = data[start : end + 1]
        self._send(status, data, headers, ctype="application/octet-stream")
