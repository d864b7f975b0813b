"""The OpenAI-compatible annotator: against a scripted OpenAI-compatible HTTP server on 127.0.0.1
(log-prob and text answers, unreadable ones, the API key from the environment), and against a real
`transformers serve` of the local SmolLM2 folder."""

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages.services.annotation import run_steps
from stages.annotators.llm import parse_choice
from stages.config import annotator_step
from stages.pipeline.errors import BadInput

PROMPTS = ["The film", "The film", "A quiet", "A quiet"]
COMPLETIONS = [" was wonderful.", " was awful.", " and dull story.", " and lovely story."]


class Scripted(BaseHTTPRequestHandler):
    """Judges prefer the continuation with a happy word; feedback scores it. `mode` picks the answer's form."""

    mode = "logprobs"
    seen_keys: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scripted.seen_keys.append(self.headers.get("Authorization"))
        text = body["messages"][0]["content"]
        happy = lambda s: any(w in s for w in ("wonderful", "lovely"))  # noqa: E731
        if "A:" in text:
            a = text.split("\nA: ")[1].split("\nB: ")[0]
            p_a = 0.9 if happy(a) else 0.2
            answer = "A" if p_a > 0.5 else "B"
            logprobs = {"content": [{"token": answer, "logprob": -0.1, "bytes": None, "top_logprobs": [
                {"token": "A", "logprob": math.log(p_a), "bytes": None},
                {"token": " B", "logprob": math.log(1 - p_a), "bytes": None}]}]}
        else:
            answer, logprobs = ("Score: 8/10. Feedback: upbeat." if happy(text) else "It is fine."), None
        if Scripted.mode == "text":
            logprobs = None
        if Scripted.mode == "garbled":
            answer, logprobs = "Hmm, hard to say.", None
        out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                            "message": {"role": "assistant", "content": answer}}]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.seen_keys = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def step(url, **kw):
    return annotator_step(kind="openai", base_url=url, model="judge-model", max_retries=0, **kw)


def test_judge_from_log_probs_in_both_orders(scripted, monkeypatch):
    Scripted.mode = "logprobs"
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    scores, _ = run_steps([step(scripted, api_key_env="JUDGE_KEY")], PROMPTS, COMPLETIONS, "annotate")
    # "wonderful" vs "awful": P(A) 0.9 shown first, 0.2 shown second -> (0.9 + 0.8) / 2
    assert scores == pytest.approx([0.85, 0.15, 0.15, 0.85])
    assert set(Scripted.seen_keys) == {"Bearer sk-test"}  # the key comes from the named variable only


def test_judge_from_answer_text_when_the_endpoint_returns_no_log_probs(scripted):
    Scripted.mode = "text"
    scores, _ = run_steps([step(scripted)], PROMPTS, COMPLETIONS, "annotate")
    assert scores == pytest.approx([1.0, 0.0, 0.0, 1.0])


def test_unreadable_answers_are_missing_never_guessed(scripted):
    Scripted.mode = "garbled"
    scores, _ = run_steps([step(scripted)], PROMPTS, COMPLETIONS, "annotate")
    assert scores == [None] * 4
    scores, feedback = run_steps([step(scripted, mode="feedback")], PROMPTS, COMPLETIONS, "annotate")
    assert scores == [None] * 4 and feedback == ["Hmm, hard to say."] * 4


def test_feedback_mode_parses_scores(scripted):
    Scripted.mode = "logprobs"
    scores, feedback = run_steps([step(scripted, mode="feedback")], PROMPTS, COMPLETIONS, "annotate")
    assert scores == [0.8, None, None, 0.8]
    assert feedback[0] == "Score: 8/10. Feedback: upbeat."


def test_an_unreachable_endpoint_is_one_line_naming_the_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(BadInput, match=r"^annotate\.steps\[0\] \(openai\) raised APIConnectionError") as e:
        run_steps([step(f"http://127.0.0.1:{port}/v1", timeout=5)], PROMPTS, COMPLETIONS, "annotate")
    assert "\n" not in str(e.value)


def test_parse_choice():
    assert [parse_choice(t) for t in ("A", " B.", "Answer: A", "a: was wonderful", "Both", "")] == \
        [1.0, 0.0, 1.0, 1.0, None, None]


@pytest.mark.slow
def test_against_transformers_serve_of_the_local_smollm2(tmp_path):
    from conftest import tiny_ready
    from stages.services.models import smollm2_dir

    if not tiny_ready():
        pytest.skip("run `make setup` first")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([str(exe), "serve", str(smollm2_dir()), "--host", "127.0.0.1", "--port", str(port),
                               "--device", "cpu"], stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                              env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(1)
        model = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
        judge = annotator_step(kind="openai", base_url=url + "/v1", model=model, concurrency=2)
        scores, _ = run_steps([judge], PROMPTS[:2], COMPLETIONS[:2], "annotate")
        assert all(s is None or 0 <= s <= 1 for s in scores) and any(s is not None for s in scores)
        if None not in scores:
            assert scores[0] == pytest.approx(1 - scores[1])
        writer = annotator_step(kind="openai", base_url=url + "/v1", model=model, mode="feedback", max_tokens=24)
        scores, feedback = run_steps([writer], PROMPTS[:2], COMPLETIONS[:2], "annotate")
        assert all(isinstance(f, str) and f for f in feedback)
        assert all(s is None or 0 <= s <= 1 for s in scores)
    finally:
        server.terminate()
        server.wait(timeout=30)
