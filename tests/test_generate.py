"""gpt3_file/generate.py against a chat-completions server started here on 127.0.0.1."""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT
from utils import run_main

pytest.importorskip("openai")
sys.path.insert(0, str(ROOT / "gpt3_file"))
import generate  # noqa: E402

KEY = "sk-test-5ecret-never-shown"


class FakeEndpoint(BaseHTTPRequestHandler):
    """Speaks the chat-completions format. The first request gets a 429, the second a
    malformed 200; later ones describe the class named in the prompt."""
    requests: list = []
    script: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        FakeEndpoint.requests.append({"auth": self.headers.get("Authorization"), "prompt": prompt,
                                      "model": body["model"]})
        action = FakeEndpoint.script.pop(0) if FakeEndpoint.script else "ok"
        if action == "429":
            self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"retry-after": "0"})
        elif action == "malformed":
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []})
        elif action == "empty":
            self._send(200, self._completion("   \n  "))
        elif action == "echo":          # a server that echoes what it was sent: the headers included
            self._send(200, self._completion("\n".join(f"{k}: {v}" for k, v in self.headers.items())))
        elif action == "echo-inline":   # the key inside a sentence that would otherwise pass as a description
            self._send(200, self._completion(f"A robin whose token is {self.headers['Authorization'][7:]}."))
        elif action in ("endless", "trickle"):   # an answer that never ends, or that comes a byte at a time
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                for _ in range(10 ** 6 if action == "endless" else 200):
                    self.wfile.write(b" " * (1 << 16) if action == "endless" else b" ")
                    self.wfile.flush()
                    if action == "trickle":
                        __import__("time").sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            name = prompt.split("What does a ")[1].split(" look like?")[0]
            first = 3 * len(FakeEndpoint.requests)   # fresh wording for every request
            lines = "\n".join(f"{i - first + 1}. A {name} seen from angle {i}, clearly a {name}."
                              for i in range(first, first + 3))
            self._send(200, self._completion(lines))

    @staticmethod
    def _completion(text):
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]}

    def _send(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    FakeEndpoint.requests, FakeEndpoint.script = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def generate_cli(endpoint, out, *extra, capsys):
    argv = ["--base-url", endpoint, "--out", str(out), "--n", "5", "--model", "tiny-llm", "--retry-delay", "0",
            "--max-retries", "3", *extra]
    code = run_main(generate.main, argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.slow
def test_descriptions_survive_a_429_and_a_malformed_reply(endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    FakeEndpoint.script = ["429", "malformed", "ok", "empty"]
    out = tmp_path / "birds_prompt.json"
    code, text = generate_cli(endpoint, out, "--classes", "blue_tit", "robin", capsys=capsys)
    assert code == 0, text
    data = json.loads(out.read_text())
    assert list(data) == ["blue tit", "robin"]                       # CaFo keys: spaces
    assert all(len(v) == 5 and all(isinstance(s, str) and s.strip() for s in v) for v in data.values())
    assert all(s.startswith("A robin seen from angle ") for s in data["robin"])   # numbering stripped
    assert all(r["auth"] == f"Bearer {KEY}" and r["model"] == "tiny-llm" for r in FakeEndpoint.requests)
    assert FakeEndpoint.requests[0]["prompt"].startswith("What does a blue tit look like?")
    assert KEY not in text and "asking again" in text


@pytest.mark.slow
def test_resume_skips_classes_already_described(endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "birds_prompt.json"
    assert generate_cli(endpoint, out, "--classes", "robin", capsys=capsys)[0] == 0
    before = len(FakeEndpoint.requests)
    code, text = generate_cli(endpoint, out, "--classes", "robin", "wren", capsys=capsys)
    assert code == 0 and "1 already described" in text
    assert all("wren" in r["prompt"] for r in FakeEndpoint.requests[before:])
    assert set(json.loads(out.read_text())) == {"robin", "wren"}
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_persistent_failures_and_missing_key_are_one_line_errors(endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, text = generate_cli(endpoint, tmp_path / "x.json", "--classes", "robin", capsys=capsys)
    assert code == 2 and "no API key" in text
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    FakeEndpoint.script = ["malformed"] * 10
    code, text = generate_cli(endpoint, tmp_path / "x.json", "--classes", "robin", capsys=capsys)
    assert code == 2 and "no usable answer after 4 attempts" in text and KEY not in text
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("action", ["echo", "echo-inline"])
def test_an_answer_holding_the_api_key_is_never_written(endpoint, tmp_path, capsys, monkeypatch, action):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "birds_prompt.json"
    assert generate_cli(endpoint, out, "--classes", "wren", capsys=capsys)[0] == 0    # one class described
    FakeEndpoint.script = [action]
    code, text = generate_cli(endpoint, out, "--classes", "wren", "robin", capsys=capsys)
    assert code == 2 and "answer contains your API key" in text and KEY not in text
    assert KEY not in out.read_text() and set(json.loads(out.read_text())) == {"wren"}
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("url,fragment", [("refused", "refused the connection"),
                                          ("http://no-such-host.invalid/v1", "is unknown")])
def test_a_refused_connection_or_an_unknown_host_fails_in_seconds(tmp_path, capsys, monkeypatch, url, fragment):
    import socket
    import time
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    if url == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    start = time.monotonic()
    code, text = generate_cli(url, tmp_path / "x.json", "--classes", "robin", capsys=capsys)
    assert code == 2 and fragment in text and time.monotonic() - start < 10


@pytest.mark.parametrize("action", ["endless", "trickle"])
def test_an_answer_that_never_ends_or_trickles_is_bounded_in_size_and_time(endpoint, tmp_path, capsys, monkeypatch,
                                                                             action):
    import resource
    import time
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    FakeEndpoint.script = [action] * 10
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    code, err = generate_cli(endpoint, tmp_path / "o.json", "--classes", "robin", "--timeout", "1",
                             "--max-retries", "0", capsys=capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: no usable answer"), err
    assert ("longer than 1,048,576 bytes" if action == "endless" else "took longer than 1s") in last
    assert time.monotonic() - start < 15
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB: not the endless body
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("question", ["What does a {season} {} look like?", "Describe {0}.", "No field here?",
                                      "A {:>300000000}?", "{{}} looks like?"])
def test_a_question_holds_exactly_one_plain_field(tmp_path, capsys, monkeypatch, question):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    code = run_main(generate.main, ["--classes", "robin", "--out", str(tmp_path / "o.json"), "--question", question])
    err = capsys.readouterr().err
    assert code == 2 and "--question" in err and "exactly one plain '{}'" in err


@pytest.mark.parametrize("content,fragment", [(b"robin\nm\xe9sange\n", "not UTF-8"), (b"robin\x00\n", "binary"),
                                              (None, "FIFO")])
def test_a_class_names_file_goes_through_the_one_text_reader(tmp_path, capsys, monkeypatch, content, fragment):
    import os
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    names = tmp_path / "classes.txt"
    if content is None:
        os.mkfifo(names)
    else:
        names.write_bytes(content)
    code = run_main(generate.main, ["--classnames", str(names), "--name", "x", "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
