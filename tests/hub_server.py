"""A small Hub-protocol server for tests: the real `huggingface_hub` client talks to it over HTTP.

No Hub is reachable from CI and no self-hosted Hub installs offline, so the test suite ships the
subset of the protocol that `create_repo`, `create_branch`, `create_commit` (LFS upload path),
`repo_info`, `list_repo_tree`, `hf_hub_download`/`snapshot_download` and `from_pretrained` use:

    POST /api/repos/create                               create a repo (409 if it exists)
    POST /api/validate-yaml                              README front matter must be a YAML mapping
    POST /api/models/{ns}/{name}/preupload/{rev}         "lfs" or "regular" per file, + remote oid
    POST /{ns}/{name}.git/info/lfs/objects/batch         LFS batch API: upload + verify actions
    PUT  /lfs-upload/{sha256}, POST /lfs-verify          the LFS upload target (sha256 checked)
    POST /api/models/{ns}/{name}/commit/{rev}            NDJSON commit: file / lfsFile / deleted*
    POST /api/models/{ns}/{name}/branch/{branch}         create a branch from main
    GET  /api/models/{ns}/{name}[/revision/{rev}]        repo info (sha, siblings)
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]     file listing with blob ids and LFS info
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}           downloads with X-Repo-Commit / ETag headers

Writes need `Authorization: Bearer <token>` with a token from `tokens`; private repos need one to
be read. Everything is stored on disk under `root`: blobs by content hash, commits and branches
in one JSON file per repo. Requests are recorded (method, path, whether a token was sent, never
the token itself) so tests can assert what a client did.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".data", ".onnx_data", ".png", ".gguf", ".pt", ".pth", ".ckpt")
LFS_MIN_SIZE = 5 * 1024 * 1024
_REPO = r"(?P<ns>[\w.-]+)/(?P<name>[\w.-]+)"
_ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", "create_branch"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", r"/lfs-verify", "lfs_verify"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStore:
    """Repos, commits and blobs on disk. One lock: commits are rare and small."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def _meta_path(self, repo: str) -> Path:
        return self.root / "repos" / repo / "meta.json"

    def exists(self, repo: str) -> bool:
        return self._meta_path(repo).is_file()

    def meta(self, repo: str) -> dict:
        if not self.exists(repo):
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads(self._meta_path(repo).read_text())

    def save_meta(self, repo: str, meta: dict) -> None:
        path = self._meta_path(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(path)

    def blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key

    def put_blob(self, key: str, data: bytes) -> None:
        path = self.blob_path(key)
        if not path.exists():
            tmp = path.with_name(path.name + f".tmp-{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)

    def resolve(self, meta: dict, rev: str) -> str:
        rev = unquote(rev)
        if rev in meta["branches"]:
            return meta["branches"][rev]
        if rev in meta["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


class HubRequestHandler(BaseHTTPRequestHandler):
    server: LocalHubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ── plumbing ──────────────────────────────────────────────────────────
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.user = self.server.tokens.get(self._bearer())
        self.server.requests.append({"method": method, "path": url.path, "auth": self._bearer() is not None})
        body = self._read_body()
        try:
            for route_method, pattern, handler in _ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    getattr(self, f"h_{handler}")(body=body, **{k: v for k, v in match.groupdict().items()})
                    return
            raise HubError(404, f"no route for {method} {url.path}")
        except HubError as exc:
            headers = {"X-Error-Message": exc.message}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            self._send(exc.status, {"error": exc.message}, headers=headers)

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, *, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD response has headers only, or the connection desyncs
            self.wfile.write(data)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _need_user(self) -> str:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def _readable_meta(self, repo: str) -> dict:
        meta = self.server.store.meta(repo)
        if meta["private"] and self.user is None:
            raise HubError(401, f"Repository {repo} not found", "RepoNotFound")  # the Hub hides private repos
        return meta

    @property
    def base(self) -> str:
        return self.server.url

    # ── write routes ──────────────────────────────────────────────────────
    def h_create_repo(self, body: bytes):
        self._need_user()
        payload = json.loads(body)
        repo = f"{payload.get('organization') or self.user}/{payload['name']}"
        with self.server.store.lock:
            if self.server.store.exists(repo):
                return self._send(409, {"error": "You already created this model repo", "url": f"{self.base}/{repo}"})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.server.store.save_meta(repo, {"private": private, "branches": {"main": None}, "commits": {}})
        self._send(200, {"url": f"{self.base}/{repo}", "name": repo, "id": repo})

    def h_validate_yaml(self, body: bytes):
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if not match:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        if not isinstance(data, dict):
            return self._send(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        self._send(200, {"errors": [], "warnings": []})

    def h_preupload(self, body: bytes, ns: str, name: str, rev: str):
        self._need_user()
        repo, store = f"{ns}/{name}", self.server.store
        meta = store.meta(repo)
        head = meta["branches"].get(unquote(rev))
        files = meta["commits"][head]["files"] if head else {}
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["size"] >= LFS_MIN_SIZE or f["path"].endswith(LFS_SUFFIXES)
            remote = files.get(f["path"])
            oid = None if remote is None else (remote["sha256"] if remote.get("sha256") else remote["oid"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out})

    def h_lfs_batch(self, body: bytes, ns: str, name: str):
        self._need_user()
        self.server.store.meta(f"{ns}/{name}")
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.server.store.blob_path(obj["oid"]).exists():
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.base}/lfs-verify", "header": {}},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def h_lfs_upload(self, body: bytes, oid: str):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        self.server.store.put_blob(oid, body)
        self._send(200, {})

    def h_lfs_verify(self, body: bytes):
        obj = json.loads(body)
        path = self.server.store.blob_path(obj["oid"])
        if not path.exists() or path.stat().st_size != obj["size"]:
            raise HubError(404, f"LFS object {obj['oid']} not found")
        self._send(200, {})

    def h_create_branch(self, body: bytes, ns: str, name: str, rev: str):
        self._need_user()
        repo, store, branch = f"{ns}/{name}", self.server.store, unquote(rev)
        with store.lock:
            meta = store.meta(repo)
            if branch in meta["branches"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            meta["branches"][branch] = store.resolve(meta, start)  # None: branching off an empty main
            store.save_meta(repo, meta)
        self._send(200, {})

    def h_commit(self, body: bytes, ns: str, name: str, rev: str):
        self._need_user()
        repo, store, branch = f"{ns}/{name}", self.server.store, unquote(rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        with store.lock:
            meta = store.meta(repo)
            if branch not in meta["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = meta["branches"][branch]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(meta["commits"][parent]["files"]) if parent else {}
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    oid = git_blob_sha1(data)
                    store.put_blob(oid, data)
                    files[value["path"]] = {"oid": oid, "size": len(data)}
                elif key == "lfsFile":
                    blob = store.blob_path(value["oid"])
                    if not blob.exists():
                        raise HubError(422, f"LFS file {value['path']} was not uploaded")
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {blob.stat().st_size}\n"
                    files[value["path"]] = {
                        "oid": git_blob_sha1(pointer.encode()),
                        "size": blob.stat().st_size,
                        "sha256": value["oid"],
                        "pointer_size": len(pointer),
                    }
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            commit = {"parent": parent, "files": files, "title": header["summary"], "date": time.time()}
            oid = hashlib.sha1(json.dumps([commit, len(meta["commits"])], sort_keys=True).encode()).hexdigest()
            meta["commits"][oid] = commit
            meta["branches"][branch] = oid
            store.save_meta(repo, meta)
        self._send(200, {"commitUrl": f"{self.base}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    # ── read routes ───────────────────────────────────────────────────────
    def h_whoami(self, body: bytes):
        self._send(200, {"type": "user", "name": self._need_user(), "orgs": [], "auth": {"type": "access_token"}})

    def _files_at(self, repo: str, rev: str) -> tuple[dict, str, dict]:
        meta = self._readable_meta(repo)
        sha = self.server.store.resolve(meta, rev)
        if sha is None:
            raise HubError(404, f"{repo} has no commit yet", "RevisionNotFound")
        return meta, sha, meta["commits"][sha]["files"]

    def h_repo_info(self, body: bytes, ns: str, name: str, rev: str | None = None):
        repo = f"{ns}/{name}"
        meta, sha, files = self._files_at(repo, rev or "main")
        self._send(
            200,
            {
                "id": repo,
                "author": ns,
                "sha": sha,
                "private": meta["private"],
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(files)],
                "downloads": 0,
                "likes": 0,
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(meta["commits"][sha]["date"])),
            },
        )

    def h_tree(self, body: bytes, ns: str, name: str, rev: str, path: str | None = None):
        _, _, files = self._files_at(f"{ns}/{name}", rev)
        prefix = (unquote(path).rstrip("/") + "/") if path else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            f = files[p]
            entry = {"type": "file", "path": p, "size": f["size"], "oid": f["oid"]}
            if f.get("sha256"):
                entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": f["pointer_size"]}
            entries.append(entry)
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)]
        self._send(200, entries)

    def h_resolve(self, body: bytes, ns: str, name: str, rev: str, path: str):
        _, sha, files = self._files_at(f"{ns}/{name}", rev)
        f = files.get(unquote(path))
        if f is None:
            raise HubError(404, f"{path} not found at {rev}", "EntryNotFound")
        key = f.get("sha256") or f["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f["oid"]}"', "Accept-Ranges": "bytes"}
        if f.get("sha256"):
            headers.update({"X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(f["size"])})
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(f["size"])}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        data = self.server.store.blob_path(key).read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match:
            data = data[int(match.group(1)) :]
            return self._send(206, raw=data, headers=headers)
        self._send(200, raw=data, headers=headers)


class LocalHubServer(ThreadingHTTPServer):
    """`with LocalHubServer(root, tokens={"hf_...": "user"}) as hub:` → `hub.url` on 127.0.0.1."""

    daemon_threads = True

    def __init__(self, root: Path, *, tokens: dict[str, str], port: int = 0):
        super().__init__(("127.0.0.1", port), HubRequestHandler)
        self.store = HubStore(root)
        self.tokens = dict(tokens)
        self.requests: list[dict] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> LocalHubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def commits(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit ids on `branch`, newest first."""
        meta = self.store.meta(repo_id)
        out, sha = [], meta["branches"].get(branch)
        while sha:
            out.append(sha)
            sha = meta["commits"][sha]["parent"]
        return out


if __name__ == "__main__":  # python -m tests.hub_server --root DIR --token TOKEN [--port 8765]
    import argparse

    parser = argparse.ArgumentParser(description="a local Hub-protocol server (for trying `gradprune export hub`)")
    parser.add_argument("--root", required=True, help="where repos and files are stored")
    parser.add_argument("--token", required=True, help="the token clients must send (HF_TOKEN)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = LocalHubServer(Path(args.root), tokens={args.token: "user"}, port=args.port)
    print(f"Hub-protocol server on {server.url}: export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1", flush=True)
    server.serve_forever()
