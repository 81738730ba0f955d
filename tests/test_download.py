"""convert/download.py against a stand-in for the Hub: a local HTTP server that answers the few endpoints
huggingface_hub calls, so the real download code runs, end to end, in a subprocess.

The endpoints and headers follow huggingface_hub 2.x: HfApi.model_info (GET /api/models/REPO[/revision/REV]),
list_repo_tree (GET /api/models/REPO/tree/REV) and hf_hub_download (HEAD, then GET /REPO/resolve/REV/FILE, which
needs X-Repo-Commit and an ETag). Error answers carry the X-Error-Code header that hf_raise_for_status reads.
"""

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import torch
from tiny_hf import save_hf_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from checkpoint import load_model
from model import InputError
from conftest import ROOT
from convert.download import download
from test_convert import TOL, assert_one_line_error
from tokenizer import Tokenizer

TOKEN = "hf_test_token"  # what the gated repo accepts


def repo_files(hf_dir, *extra):
    """{name: bytes} of a save_pretrained directory, plus (name, bytes) pairs."""
    files = {p.name: p.read_bytes() for p in hf_dir.iterdir() if p.is_file()}
    files.update(extra)
    return files


def repo(files, gated=False):
    # A commit id the way the Hub has it: 40 hex digits, here derived from the content
    sha = hashlib.sha1(b"".join(sorted(files.values()))).hexdigest()
    return dict(files=files, sha=sha, gated=gated)


class FakeHub(BaseHTTPRequestHandler):
    """Serves self.server.repos: {repo_id: repo(...)}; records every request in self.server.requests."""

    def do_GET(self):
        self.answer(send_body=True)

    def do_HEAD(self):
        self.answer(send_body=False)

    def answer(self, send_body):
        path = urlsplit(self.path).path
        self.server.requests.append((self.command, unquote(path)))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo_id, revision, kind = m[1], m[2], "info"
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            repo_id, revision, kind = m[1], m[2], "tree"
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo_id, revision, kind = m[1], m[2], "file"
        else:
            return self.send(404, b"", {})
        if self.headers.get("Authorization") not in (None, f"Bearer {TOKEN}"):  # the Hub checks any token it is sent
            return self.send(401, b"", {"X-Error-Message": "Invalid credentials in Authorization header"})
        repo = self.server.repos.get(repo_id)
        if repo is None:  # what the Hub answers an anonymous caller for a missing (or private) repo
            return self.send(401, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if unquote(revision or "main") not in ("main", repo["sha"]):
            return self.send(404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        files = repo["files"]
        if kind == "info":
            info = dict(id=repo_id, sha=repo["sha"], private=False, gated="auto" if repo["gated"] else False,
                        siblings=[{"rfilename": name} for name in files])
            return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, send_body)
        if kind == "tree":
            return self.send(200, json.dumps([tree_entry(n, b) for n, b in files.items()]).encode(),
                             {"Content-Type": "application/json"}, send_body)
        # Gated repos show their listing to anyone but their files only to a token that was granted access
        if repo["gated"] and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.send(401, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access is restricted"})
        name = unquote(m[3])
        if name not in files:
            return self.send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["sha"]})
        body = files[name]
        return self.send(200, body, {"X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha256(body).hexdigest()}"'},
                         send_body)

    def send(self, status, body, headers, send_body=True):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, *args):  # keep pytest's output clean
        pass


def tree_entry(name, body):
    entry = dict(type="file", path=name, size=len(body), oid=hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest())
    if name.endswith((".safetensors", ".bin")):  # weights are LFS files on the Hub
        entry["lfs"] = dict(oid=hashlib.sha256(body).hexdigest(), size=len(body), pointerSize=134)
    return entry


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    hf_model = save_hf_model("llama", root / "llama")
    tokenizer = HFTokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    bin_weights = io.BytesIO()
    torch.save(hf_model.state_dict(), bin_weights)
    safetensors_and_bin = repo_files(root / "llama", ("tokenizer.json", tokenizer.to_str().encode()),
                                     ("pytorch_model.bin", bin_weights.getvalue()), ("README.md", b"# tiny llama"))
    bin_only = {k: v for k, v in safetensors_and_bin.items() if k != "model.safetensors"}

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.repos = {"tiny/llama": repo(safetensors_and_bin), "tiny/llama-bin": repo(bin_only),
                    "tiny/gated": repo(safetensors_and_bin, gated=True),
                    "tiny/gguf": repo({"README.md": b"# weights for llama.cpp", "model.gguf": b"GGUF"})}
    server.requests = []
    server.hf_model = hf_model
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def run_download(hub, tmp_path, *args, endpoint=None, command=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no token or offline mode from outside
    # huggingface_hub reads these at import, hence the subprocess. Progress bars go to stderr and would sit above
    # a one-line error there; xet would try a storage service our stand-in does not have.
    env.update(HF_ENDPOINT=endpoint or f"http://127.0.0.1:{hub.server_port}", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1")
    command = command or [sys.executable, "-m", "convert.download", "--checkpoint_dir", str(tmp_path / "ckpt")]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def assert_converted(hub, out_dir):
    model = load_model(out_dir)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hub.hf_model(idx).logits, **TOL)
    assert Tokenizer(out_dir).encode("hello") == [3]


def test_downloads_safetensors_only_and_converts(hub, tmp_path):
    hub.requests.clear()
    result = run_download(hub, tmp_path, "tiny/llama")
    assert result.returncode == 0, result.stderr
    raw, out = tmp_path / "ckpt" / "hf" / "tiny" / "llama", tmp_path / "ckpt" / "tiny" / "llama"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(raw))
    assert not (raw / "pytorch_model.bin").exists() and not (raw / "README.md").exists()
    assert not any("pytorch_model.bin" in path for _, path in hub.requests)  # not even a HEAD
    assert_converted(hub, out)
    assert str(out) in result.stdout

    # A second run has every file at this commit (huggingface_hub keeps the commit of each in raw/.cache/): one
    # request to learn the current commit, none for the files. An index left by another revision, which from_hf.py
    # would prefer to model.safetensors, is removed.
    (raw / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    hub.requests.clear()
    assert run_download(hub, tmp_path, "tiny/llama").returncode == 0
    assert hub.requests == [("GET", "/api/models/tiny/llama")]
    assert not (raw / "model.safetensors.index.json").exists()
    assert_converted(hub, out)


def test_bin_when_the_repo_has_no_safetensors(hub, tmp_path):
    result = run_download(hub, tmp_path, "tiny/llama-bin")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ckpt" / "hf" / "tiny" / "llama-bin" / "pytorch_model.bin").is_file()
    assert_converted(hub, tmp_path / "ckpt" / "tiny" / "llama-bin")


def test_gated_repo_needs_a_token(hub, tmp_path):
    result = run_download(hub, tmp_path, "tiny/gated")
    assert_one_line_error(result, "tiny/gated", "gated", "--access_token")
    assert not (tmp_path / "ckpt" / "tiny" / "gated").exists()
    result = run_download(hub, tmp_path, "tiny/gated", "--access_token", TOKEN)
    assert result.returncode == 0, result.stderr
    assert_converted(hub, tmp_path / "ckpt" / "tiny" / "gated")


HUB_ERRORS = [
    (["tiny/missing"], ["tiny/missing", "no such model", "--access_token"]),
    (["tiny/llama", "--revision", "v9"], ["tiny/llama", "revision 'v9' not found"]),
    (["tiny/llama", "--access_token", "hf_revoked"], ["tiny/llama", "refused the token", "--access_token"]),
    (["tiny/gguf"], ["tiny/gguf", "config.json", "model.gguf"]),
]


def test_errors_are_one_line_and_write_nothing(hub, tmp_path):
    """Each case through download.py's command line, all in one process (huggingface_hub reads its endpoint at
    import, so not this one): the InputError its __main__ prints as 'error: ...' (test_gated_repo_needs_a_token
    runs __main__ itself)."""
    cases = [[*args, "--checkpoint_dir", str(tmp_path / "ckpt")] for args, _ in HUB_ERRORS]
    script = ("import json, sys\n"
              "from jsonargparse import CLI\n"
              "from convert.download import download\n"
              "from model import InputError\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    try:\n"
              "        CLI(download, args=args, as_positional=True, exit_on_error=False)\n"
              "        print(json.dumps(None))\n"
              "    except InputError as e:\n"
              "        print(json.dumps(str(e)))\n")
    result = run_download(hub, tmp_path, json.dumps(cases), command=[sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(errors) == len(HUB_ERRORS)
    for (args, needles), error in zip(HUB_ERRORS, errors):
        assert error is not None and "\n" not in error and all(n in error for n in needles), (args, error)
        assert not (tmp_path / "ckpt" / args[0]).exists()


def test_bad_dtype_fails_before_the_download(tmp_path):
    # No stand-in here: had the check moved after a request to the Hub, the error would be another one
    with pytest.raises(InputError, match="--dtype 'int3': expected one of float32, bfloat16, float16"):
        download("tiny/llama", dtype="int3", checkpoint_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_unreachable_hub(hub, tmp_path):
    with socket.socket() as sock:  # bound but not listening: connections to its port are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = run_download(hub, tmp_path, "tiny/llama", endpoint=f"http://127.0.0.1:{port}")
    assert_one_line_error(result, "tiny/llama", "cannot reach", f"127.0.0.1:{port}")
    assert not (tmp_path / "ckpt" / "tiny" / "llama").exists()
