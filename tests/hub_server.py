"""A loopback stand-in for the Hugging Face Hub's write API, so pushes can be tested offline.

It answers what huggingface_hub 2.4 sends for `create_repo`, `create_branch`, `create_commit` (validate-yaml,
preupload, the git-LFS batch API with single-part or multipart upload and verify, the NDJSON commit) and
`repo_info`, and keeps what arrived per repo and branch as {path: bytes}.

Not Xet: with `hf_xet` importable, huggingface_hub sends every "lfs"-mode file through Xet storage and never
falls back to LFS. Tests therefore either set `huggingface_hub.constants.HF_HUB_DISABLE_XET`, or build the server
with `lfs=False` so that preupload answers "regular" for every file and contents come base64 in the commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

# Files the Hub's default .gitattributes routes to LFS; the Hub also sends anything over 10 MiB there.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".model")
LFS_MIN_SIZE = 10 * 2**20
REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Branch:
    head: str
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit summaries, oldest first


@dataclass
class Repo:
    private: bool
    branches: dict[str, Branch]


class HubError(Exception):
    """Turned by the handler into an error response shaped like the Hub's: a JSON body, maybe X-Error-* headers."""

    def __init__(self, status: int, body: dict, headers: dict[str, str] | None = None):
        super().__init__(body)
        self.status, self.body, self.headers = status, body, headers or {}


class HubServer:
    """Use as a context manager; `url` is the endpoint to give huggingface_hub (HF_ENDPOINT).

    Only `token` is accepted on Hub API routes; any other gets 401 as the Hub answers an invalid token, so a
    server whose `token` nobody knows rejects everything. `multipart_chunk` makes LFS uploads larger than it
    multipart, as the Hub does for large files.
    """

    def __init__(self, token: str = "hf_test_token", *, lfs: bool = True, multipart_chunk: int | None = None):
        self.token, self.lfs, self.multipart_chunk = token, lfs, multipart_chunk
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> content
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._parts: dict[str, dict[int, bytes]] = {}  # multipart uploads in progress
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # shutdown() waits for the serving loop's next poll: 0.5 s by default, on every test that serves.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision].files)

    # ---------------------------------------------------------------- routes

    def routes(self):
        """(method, path regex, whether the token is required, handler taking the body and the named groups)."""
        return [
            ("POST", r"/api/repos/create", True, self.create_repo),
            ("POST", r"/api/validate-yaml", True, self.validate_yaml),
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>.+))?", True, self.repo_info),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", True, self.create_branch),
            ("PUT", rf"/api/models/{REPO}/settings", True, self.update_settings),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>.+)", True, self.preupload),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>.+)", True, self.commit),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", True, self.lfs_batch),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", True, self.lfs_verify),
            # Object storage takes presigned URLs, no token, like the S3 URLs the Hub hands out.
            ("PUT", r"/storage/(?P<oid>[0-9a-f]{64})(?:/(?P<part>\d+))?", False, self.storage_put),
            ("POST", r"/storage/(?P<oid>[0-9a-f]{64})", False, self.storage_complete),
        ]

    def update_settings(self, body: bytes, repo: str) -> dict:
        payload = json.loads(body)
        if "private" in payload:
            self._repo(repo).private = bool(payload["private"])
        return {}

    def create_repo(self, body: bytes) -> dict:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, {"error": "You already created this model repo", "url": url})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private",
                                   branches={"main": Branch(head=_new_oid())})
        return {"url": url, "name": repo_id}

    def validate_yaml(self, body: bytes) -> dict:
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        metadata = yaml.safe_load(match[1]) if match else {}
        if not isinstance(metadata, dict) or not all(isinstance(tag, str) for tag in metadata.get("tags", [])):
            raise HubError(400, {"errors": [{"message": "metadata must be a mapping, tags strings"}]})
        return {"errors": [], "warnings": []}

    def repo_info(self, body: bytes, repo: str, rev: str | None) -> dict:
        branch = self._branch(repo, rev or "main")
        return {"id": repo, "sha": branch.head, "private": self.repos[repo].private,
                "siblings": [{"rfilename": path} for path in branch.files]}

    def create_branch(self, body: bytes, repo: str, branch: str) -> dict:
        start = json.loads(body or b"{}").get("startingPoint", "main")
        branches = self._repo(repo).branches
        if branch in branches:
            raise HubError(409, {"error": "Reference already exists"})
        source = self._branch(repo, start)
        branches[branch] = Branch(head=source.head, files=dict(source.files), commits=list(source.commits))
        return {}

    def preupload(self, body: bytes, repo: str, rev: str) -> dict:
        stored = self._branch(repo, rev).files
        answers = []
        for file in json.loads(body)["files"]:
            mode = "lfs" if self.lfs and (file["path"].endswith(LFS_SUFFIXES) or file["size"] >= LFS_MIN_SIZE) \
                else "regular"
            answer = {"path": file["path"], "uploadMode": mode, "shouldIgnore": False}
            if file["path"] in stored:
                # The client skips a file whose oid it matches: sha256 for LFS, git blob sha1 otherwise.
                content = stored[file["path"]]
                answer["oid"] = hashlib.sha256(content).hexdigest() if mode == "lfs" else _git_blob_sha1(content)
            answers.append(answer)
        return {"files": answers}

    def lfs_batch(self, body: bytes, repo: str) -> dict:
        self._repo(repo)
        objects = []
        for obj in json.loads(body)["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:  # a stored object gets no "actions", so the client skips its upload
                upload = {"href": f"{self.url}/storage/{oid}"}
                if self.multipart_chunk and size > self.multipart_chunk:
                    parts = -(-size // self.multipart_chunk)
                    upload["header"] = {"chunk_size": str(self.multipart_chunk),
                                        **{str(n): f"{self.url}/storage/{oid}/{n}" for n in range(1, parts + 1)}}
                answer["actions"] = {"upload": upload,
                                     "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify"}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def storage_put(self, body: bytes, oid: str, part: str | None) -> dict | tuple[dict, dict]:
        if part is None:
            self._store_object(oid, body)
            return {}
        self._parts.setdefault(oid, {})[int(part)] = body
        return {}, {"ETag": f'"{oid[:8]}-{part}"'}

    def storage_complete(self, body: bytes, oid: str) -> dict:
        received = self._parts.pop(oid, {})
        numbers = [part["partNumber"] for part in json.loads(body)["parts"]]
        if sorted(received) != numbers:
            raise HubError(400, {"error": f"parts {numbers} do not match the uploaded {sorted(received)}"})
        self._store_object(oid, b"".join(received[n] for n in numbers))
        return {}

    def lfs_verify(self, body: bytes, repo: str) -> dict:
        obj = json.loads(body)
        if obj["oid"] not in self.lfs_objects or len(self.lfs_objects[obj["oid"]]) != obj["size"]:
            raise HubError(404, {"error": "object not found"})
        return {}

    def commit(self, body: bytes, repo: str, rev: str) -> dict:
        branch = self._branch(repo, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = dict(branch.files)
        for line in lines[1:]:  # lines[0] is the header
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                files[value["path"]] = self.lfs_objects[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {path: data for path, data in files.items() if not path.startswith(value["path"] + "/")}
            else:
                raise HubError(400, {"error": f"unknown commit operation {key}"})
        branch.files, branch.head = files, _new_oid()
        branch.commits.append(lines[0]["value"]["summary"])
        return {"success": True, "commitOid": branch.head, "commitUrl": f"{self.url}/{repo}/commit/{branch.head}",
                "pullRequestUrl": None}

    def _store_object(self, oid: str, content: bytes) -> None:
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, {"error": "content does not match its sha256"})
        self.lfs_objects[oid] = content

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return self.repos[repo_id]

    def _branch(self, repo_id: str, revision: str) -> Branch:
        branches = self._repo(repo_id).branches
        if revision not in branches:
            raise HubError(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        return branches[revision]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response carries Content-Length

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        body = self._read_body()
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
            try:
                status, (payload, headers) = 200, self._route(path, body)
            except HubError as error:
                status, payload, headers = error.status, error.body, error.headers
        self._respond(status, payload, headers)

    def _route(self, path: str, body: bytes) -> tuple[dict, dict[str, str]]:
        for method, pattern, needs_token, handler in self.hub.routes():
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                if needs_token and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
                    # What the Hub answers an invalid token; that header makes huggingface_hub report a plain 401.
                    raise HubError(401, {"error": "Invalid username or password."},
                                   {"X-Error-Message": "Invalid credentials in Authorization header"})
                result = handler(body, **{key: unquote(value) if value else value
                                          for key, value in match.groupdict().items()})
                return result if isinstance(result, tuple) else (result, {})
        raise HubError(404, {"error": f"no route for {self.command} {path}"})

    def _read_body(self) -> bytes:
        # Files are streamed, which httpx sends chunked; http.server leaves decoding that to us.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _respond(self, status: int, payload: dict, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args) -> None:
        pass  # `HubServer.requests` keeps the log; stderr stays quiet


def _new_oid() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
