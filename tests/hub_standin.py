"""A stand-in for the Hugging Face Hub on loopback, for tests of the real push code.

It stands in for the network only: the code under test is `huggingface_hub` and `datasets`'
own `push_to_hub`, pointed here with `HF_ENDPOINT`. It keeps dataset and model repositories in memory
(files per branch, commits), answers the few endpoints a push uses (create repo, repo info,
branch, pre-upload, commit, tree listing, file download) and records every request, with its
headers, so a test can check what was sent (and that the token went only in the header).
Parquet and other binary files go through the Git LFS batch API with the `basic` transfer
(one PUT each), the rest inline in the commit, as on the Hub; no Xet transfer is offered. Unknown routes answer 404 and are recorded, so a test sees what it missed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    private: bool
    repo_type: str = "dataset"  # "model" or "dataset", as created
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0


class _Rejected(Exception):
    """A commit the Hub would refuse; carries the error response to send."""

    def __init__(self, response) -> None:
        super().__init__()
        self.response = response


class StandInHub:
    def __init__(self, fail_commits_after: int | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lfs: dict[str, bytes] = {}  # sha256 → content
        self.fail_commits_after = fail_commits_after  # simulate a network failure mid-push
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with hub._lock:
                    hub.requests.append(req)
                    status, headers, payload = hub.route(req, f"http://{self.headers['Host']}")
                req.status = status
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- routing ---------------------------------------------------------------------------

    @staticmethod
    def _json(obj, status: int = 200, headers: dict | None = None):
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()

    def _not_found(self, code: str = "EntryNotFound"):
        return self._json({"error": "not found"}, 404, {"X-Error-Code": code})

    def route(self, req: Request, base: str):
        url = urlparse(req.path)
        path, query = unquote(url.path), parse_qs(url.query)
        if req.method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(req.body or b"{}"), base)
        if req.method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(req.body or b"{}").get("content", ""))
        m = re.match(r"^/(?:datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if m and req.method == "POST":
            return self._lfs_batch(json.loads(req.body or b"{}"), base)
        m = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
        if m and req.method == "PUT":
            if hashlib.sha256(req.body).hexdigest() != m.group(1):
                return self._json({"error": "sha256 mismatch"}, 400)
            self.lfs[m.group(1)] = req.body
            return self._json({})
        m = re.match(r"^/api/(?:datasets|models)/([^/]+/[^/]+)(?:/(.*))?$", path)
        if m:
            return self._api(req, m.group(1), m.group(2) or "", query, base)
        m = re.match(r"^/(?:datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(req, m.group(1), unquote(m.group(2)), m.group(3))
        return self._not_found("RouteNotFound")

    def _lfs_batch(self, body: dict, base: str):
        """Git LFS batch API, `basic` transfer: one PUT per object not yet stored."""
        objects = []
        for o in body.get("objects", []):
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"}}
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _validate_yaml(self, content: str):
        """The card's metadata must be a YAML mapping between '---' lines (what the Hub checks
        first); a card that fails answers 400 with the error, as the Hub does."""
        import yaml

        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as e:
            return self._json({"errors": [{"message": str(e)}]}, 400)
        if not isinstance(meta, dict):
            return self._json({"errors": [{"message": "no YAML metadata block"}]}, 400)
        return self._json({"errors": [], "warnings": []})

    def _create(self, body: dict, base: str):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id not in self.repos:
            # huggingface_hub 1.x sends `visibility`; older clients `private`.
            private = bool(body.get("private")) or body.get("visibility") == "private"
            self.repos[repo_id] = Repo(private=private, repo_type=body.get("type") or "model")
        prefix = "" if self.repos[repo_id].repo_type == "model" else f"{self.repos[repo_id].repo_type}s/"
        return self._json({"url": f"{base}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _info(self, repo_id: str, rev: str):
        repo = self.repos[repo_id]
        files = repo.branches[rev]
        return self._json(
            {
                "id": repo_id,
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "private": repo.private,
                "sha": repo.heads[rev],
                "siblings": [{"rfilename": p} for p in sorted(files)],
                "tags": [],
                "cardData": {},
            }
        )

    def _api(self, req: Request, repo_id: str, rest: str, query: dict, base: str):
        if repo_id not in self.repos:
            return self._not_found("RepoNotFound")
        repo = self.repos[repo_id]
        if req.method == "GET" and (rest == "" or rest.startswith("revision/")):
            rev = unquote(rest.split("/", 1)[1]) if rest else "main"
            known = rev in repo.branches or rev in repo.heads.values()
            return self._info(repo_id, self._rev(repo, rev)) if known else self._not_found("RevisionNotFound")
        m = re.match(r"^branch/(.+)$", rest)
        if m and req.method == "POST":
            branch = unquote(m.group(1))
            if branch not in repo.branches:
                repo.branches[branch] = dict(repo.branches["main"])
                repo.heads[branch] = repo.heads["main"]
            return self._json({})
        m = re.match(r"^preupload/(.+)$", rest)
        if m:
            files = json.loads(req.body or b"{}").get("files", [])
            return self._json(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": self._mode(f["path"]), "shouldIgnore": False}
                        for f in files
                    ]
                }
            )
        m = re.match(r"^commit/(.+)$", rest)
        if m:
            return self._commit(repo_id, unquote(m.group(1)), req.body, base)
        m = re.match(r"^tree/([^/]+)/?(.*)$", rest)
        if m:
            return self._tree(repo, unquote(m.group(1)), m.group(2), query)
        m = re.match(r"^paths-info/(.+)$", rest)
        if m:
            rev = self._rev(repo, unquote(m.group(1)))
            form = parse_qs(req.body.decode()) if req.body else {}
            try:
                paths = json.loads(req.body).get("paths", [])
            except (ValueError, AttributeError):
                paths = form.get("paths", [])
            return self._json(self._entries(repo, rev, [p for p in paths], exact=True))
        return self._not_found("RouteNotFound")

    @staticmethod
    def _mode(path: str) -> str:
        """Like the Hub's default .gitattributes: binary data files go through LFS."""
        return "lfs" if path.endswith((".parquet", ".arrow", ".png", ".dcm")) else "regular"

    def _rev(self, repo: Repo, rev: str) -> str:
        """A branch name, or a commit sha (answered with the branch whose head it is)."""
        if rev in repo.branches:
            return rev
        return next((b for b, h in repo.heads.items() if h == rev), "main")

    def _entries(self, repo: Repo, rev: str, prefixes: list[str], exact: bool = False) -> list[dict]:
        files = repo.branches[rev]
        out, dirs = [], set()
        for p, data in sorted(files.items()):
            for pre in prefixes:
                pre = pre.strip("/")
                if exact and p == pre:
                    out.append(self._file_entry(p, data))
                elif exact and p.startswith(pre + "/"):
                    dirs.add(pre)
        out += [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)]
        return out

    @staticmethod
    def _file_entry(p: str, data: bytes) -> dict:
        return {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    def _tree(self, repo: Repo, rev: str, sub: str, query: dict):
        rev = self._rev(repo, rev)
        sub = unquote(sub).strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        out, dirs = [], set()
        for p, data in sorted(repo.branches[rev].items()):
            if sub and not p.startswith(sub + "/"):
                continue
            rel = p[len(sub) + 1 :] if sub else p
            if "/" in rel and not recursive:
                dirs.add((sub + "/" if sub else "") + rel.split("/", 1)[0])
                continue
            if recursive:
                parts = rel.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    dirs.add((sub + "/" if sub else "") + "/".join(parts[:i]))
            out.append(self._file_entry(p, data))
        if sub and not out and not dirs:
            return self._not_found()
        return self._json([{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)] + out)

    def _parse_commit(self, body: bytes):
        """The NDJSON commit body -> (header, added files, deleted paths); _Rejected on a bad entry."""
        header, adds, deletes = {}, {}, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise _Rejected(
                        self._json({"error": f"LFS object {value['oid']} was never uploaded"}, 400)
                    )
                adds[value["path"]] = self.lfs[value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"])
            else:
                raise _Rejected(self._json({"error": f"unsupported commit entry {key}"}, 400))
        return header, adds, deletes

    def _commit(self, repo_id: str, rev: str, body: bytes, base: str):
        repo = self.repos[repo_id]
        if self.fail_commits_after is not None and len(repo.commits) >= self.fail_commits_after:
            return self._json({"error": "stand-in network failure"}, 503)
        if rev not in repo.branches:
            return self._not_found("RevisionNotFound")
        try:
            header, adds, deletes = self._parse_commit(body)
        except _Rejected as rejected:
            return rejected.response
        parent = header.get("parentCommit")
        if parent and parent != repo.heads[rev]:
            return self._json({"error": "parent commit is not the head"}, 412)
        files = repo.branches[rev]
        for p in deletes:
            for f in [f for f in files if f == p or f.startswith(p.rstrip("/") + "/")]:
                del files[f]
        files.update(adds)
        oid = hashlib.sha1(json.dumps([repo_id, rev, len(repo.commits), sorted(adds)]).encode()).hexdigest()
        repo.heads[rev] = oid
        repo.commits.append(
            {
                "oid": oid,
                "branch": rev,
                "summary": header.get("summary"),
                "added": sorted(adds),
                "deleted": deletes,
            }
        )
        return self._json(
            {"commitUrl": f"{base}/datasets/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    def _resolve(self, req: Request, repo_id: str, rev: str, path: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._not_found("RepoNotFound")
        rev = self._rev(repo, rev)
        data = repo.branches[rev].get(path)
        if data is None:
            return self._not_found()
        etag = hashlib.sha1(data).hexdigest()
        return (
            200,
            {
                "Content-Type": "application/octet-stream",
                "ETag": f'"{etag}"',
                "X-Repo-Commit": repo.heads[rev],
                "X-Linked-Size": str(len(data)),
            },
            data,
        )

    # --- for tests ---------------------------------------------------------------------------

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[rev])

    def missed(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests if r.status == 404]
