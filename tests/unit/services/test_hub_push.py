"""`align push`: a round's policy and its card reach the hub through huggingface_hub's own client,
here against a local stand-in of the hub's HTTP API (create repo, validate-yaml, preupload, commit) that records
what it receives."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT
from stages.pipeline.store import ArtifactStore


class FakeHub(BaseHTTPRequestHandler):
    received: list = []
    commits: list = []

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, self.headers.get("authorization")))
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            return self._reply({"url": f"{host}/{payload['organization']}/{payload['name']}"})
        if self.path == "/api/validate-yaml":  # the hub checks a card's metadata before a commit
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            self.commits.append({"path": self.path, "summary": lines[0]["value"]["summary"], "files": files})
            return self._reply({"commitUrl": f"{host}/org/policy/commit/{'c' * 40}", "commitOid": "c" * 40})
        return self._reply({"error": f"not faked: {self.path}"}, 404)

    def log_message(self, *_):
        pass


@pytest.fixture
def fake_hub():
    FakeHub.received, FakeHub.commits = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", FakeHub
    server.shutdown()


def commit_stage(store, round_, stage, files, metrics=None, config=None):
    work = store.new_workdir()
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    store.commit(work, store.stage_dir("exp", round_, stage), {
        "fingerprint": "f", "run_id": f"{stage}{round_}", "rows": 1, "metrics": metrics or {}, "config": config or {}})


def push(root, env, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", "push", "exp", "--artifacts", str(root), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_push_uploads_the_last_rounds_policy_with_its_card(tmp_path, fake_hub):
    url, hub = fake_hub
    store = ArtifactStore(str(tmp_path / "a"))
    commit_stage(store, 0, "load_prompts", {"data.parquet": b"x"}, {"commit": "d" * 40},
                 {"source": "Anthropic/hh-rlhf", "hub_split": "train", "data_dir": "harmless-base",
                  "revision": "main", "format": "hh_rlhf", "chat_template": "auto"})
    for k in (0, 1):
        commit_stage(store, k, "train", {"data.parquet": b"x", "model/config.json": b'{"round": %d}' % k,
                                         "model/model.safetensors": b"w" * 64, "model/README.md": b"# card\n"})
    commit_stage(store, 1, "evaluate", {"data.parquet": b"x"},
                 {"mean_reward": 0.81, "mean_reward_ci_low": 0.8, "mean_reward_ci_high": 0.82, "reward_gain": 0.25,
                  "reward_gain_ci_low": 0.24, "reward_gain_ci_high": 0.27, "kl_to_reference": 13.7, "prompts": 400})
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": url, "HF_TOKEN": "hf_fake"}
    done = push(tmp_path / "a", env, "--repo", "org/policy")
    assert done.returncode == 0, done.stderr
    assert f"{url}/org/policy/commit/" in done.stdout.replace("\n", "")
    [commit] = hub.commits
    assert commit["summary"] == "exp round 1" and commit["files"]["config.json"] == b'{"round": 1}'
    assert set(commit["files"]) == {"config.json", "model.safetensors", "README.md"}
    card = commit["files"]["README.md"].decode()
    assert card.startswith("# card") and "`Anthropic/hh-rlhf`" in card and "data_dir `harmless-base`" in card
    assert f"commit `{'d' * 40}`" in card and "| reward | 0.81 [0.8, 0.82] |" in card
    assert "| gain over the base (paired) | 0.25 [0.24, 0.27] |" in card
    assert all(auth == "Bearer hf_fake" for _, auth in hub.received)

    assert push(tmp_path / "a", env, "--repo", "org/policy", "--round", "0").returncode == 0
    assert hub.commits[-1]["files"]["config.json"] == b'{"round": 0}'
    refused = push(tmp_path / "a", env, "--repo", "org/policy", "--round", "3")
    assert refused.returncode == 2 and "--round 3: no complete train artifact (complete rounds: 0, 1)" in refused.stderr
    offline = push(tmp_path / "a", {**env, "HF_HUB_OFFLINE": "1"}, "--repo", "org/policy")
    assert offline.returncode == 2 and "the hub is offline" in offline.stderr
