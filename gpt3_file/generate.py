"""Write class descriptions (``<name>_prompt.json``, the CaFo format) with any
OpenAI-compatible chat endpoint.

    export OPENAI_API_KEY=...                      # never printed or logged
    python gpt3_file/generate.py --name my_birds --classes robin sparrow "blue tit" --n 10
    python gpt3_file/generate.py --config configs/oxford_pets.yaml --n 20 --model gpt-4o-mini
    python gpt3_file/generate.py --name cars --classnames classes.txt \\
        --base-url http://localhost:8000/v1 --model my-local-model \\
        --question "What does a {} look like?" --question "How can you identify a {}?"

Each class gets ``--n`` short descriptions, asked per question template ('{}' = the class
name, underscores read as spaces). Answers are split into lines and validated (non-empty
text, numbering stripped). The file is rewritten atomically after every class, and classes
already holding ``--n`` descriptions are skipped: an interrupted run continues where it
stopped. Rate limits (429), server errors and dropped connections are retried with
exponential back-off by the ``openai`` client; malformed answers are asked again.
Requires ``pip install openai`` (an optional dependency, only this script uses it).
"""
from __future__ import annotations

import importlib
import os
import re
import socket
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clip.text import load_descriptions  # noqa: E402
from utils import RaftError, ToolParser, bounded, check_template, read_text, run_main, write_json  # noqa: E402

DEFAULT_QUESTION = "What does a {} look like?"
INSTRUCTION = ("Answer with {k} different one-sentence descriptions of its visual appearance, one per line, "
               "each naming the {c}. No numbering, no extra text.")
NUMBERING = re.compile(r"^\s*(?:[-*•]+|\(?\d+[.)]|\d+\s*[-:])\s*")


def parse_sentences(text: str) -> list[str]:
    """Lines of an answer as descriptions: numbering and bullets stripped, blanks dropped."""
    out = []
    for line in text.splitlines():
        line = NUMBERING.sub("", line).strip().strip('"').strip()
        if len(line) >= 3 and any(ch.isalpha() for ch in line):
            out.append(line)
    return out


def class_names(args) -> tuple[str, list[str]]:
    """(output name, class names) from --classes, --classnames or --config."""
    if args.classes:
        return args.name, list(args.classes)
    if args.classnames:   # the project's one text reader: UTF-8, bounded, a regular file
        lines = [ln.strip() for ln in read_text(args.classnames, "class names file").splitlines() if ln.strip()]
        return args.name, lines
    from run.config import build_config
    cfg = build_config(args.config, {"data_path": args.data_path} if args.data_path else {})
    if cfg.dataset == "imagenet":
        from datasets.imagenet import read_classnames
        return args.name or "imagenet", read_classnames(Path(cfg.data_path))[1]
    if cfg.dataset == "folder":
        from datasets import read_folder_dataset
        data = read_folder_dataset(cfg.data_path, cfg.split_fractions, cfg.split_seed, cfg.cache_dir)
        return args.name or data.name, data.classnames
    from datasets import read_coop_dataset
    return args.name or cfg.dataset, read_coop_dataset(cfg.dataset, cfg.data_path).classnames


CONNECT_TIMEOUT = 5.0   # seconds to open a connection before the endpoint counts as silent
ANSWER_LIMIT = 1 << 20  # bytes: an answer of a few sentences is kilobytes; a longer one is cut off as an error


def bounded_transport(httpx, seconds: float, limit: int = ANSWER_LIMIT):
    """An httpx transport whose every answer is read within ``seconds`` (in all: a server that
    sends a byte every few seconds never trips a per-read timeout) and up to ``limit`` bytes (an
    answer that never ends is not read into memory): past either, the read fails, and the
    client's retries and this script's one-line error take over. ``httpx``: the HTTP library the
    openai client is built on (httpx, or its successor)."""

    class Limited(httpx.SyncByteStream):
        def __init__(self, inner, deadline: float):
            self.inner, self.deadline = inner, deadline

        def __iter__(self):
            total = 0
            for chunk in self.inner:
                total += len(chunk)
                if total > limit:
                    raise httpx.ReadError(f"the answer is longer than {limit:,} bytes")
                if time.monotonic() > self.deadline:
                    raise httpx.ReadTimeout(f"the answer took longer than {seconds:g}s")
                yield chunk

        def close(self):
            self.inner.close()

    class Bounded(httpx.HTTPTransport):
        def handle_request(self, request):
            response = super().handle_request(request)
            response.stream = Limited(response.stream, time.monotonic() + seconds)
            return response

    return Bounded()


def reachable(base_url: str, timeout: float) -> None:
    """A refused connection or an unknown host is final: one line now, not minutes of the
    client's retries (which stay for timeouts, rate limits and server errors). Through a proxy
    (HTTPS_PROXY, ...) the proxy is what must answer."""
    url = urllib.parse.urlsplit(base_url)
    proxy = urllib.request.getproxies().get(url.scheme)
    target = urllib.parse.urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(url.hostname or "") else url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except socket.gaierror:
        raise RaftError(f"cannot reach {base_url}: the host {target.hostname} is unknown (no network, or a typo in "
                        f"--base-url)") from None
    except ConnectionRefusedError:
        raise RaftError(f"cannot reach {base_url}: {target.hostname}:{port} refused the connection") from None
    except OSError:
        return   # a timeout or a slow network: the client's own retries decide


class Asker:
    """One chat-completions request per call; malformed answers are retried here, transport
    and rate-limit errors by the openai client (exponential back-off)."""

    def __init__(self, args, api_key: str):
        try:
            import openai
        except ImportError:
            raise RaftError("gpt3_file/generate.py needs the openai package: pip install openai") from None
        self.openai = openai
        self.key = api_key
        httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])
        self.client = openai.OpenAI(api_key=api_key, base_url=args.base_url, max_retries=args.max_retries,
                                    timeout=args.timeout,
                                    http_client=openai.DefaultHttpxClient(transport=bounded_transport(httpx, args.timeout),
                                                                          timeout=args.timeout))
        reachable(str(self.client.base_url), min(args.timeout, CONNECT_TIMEOUT))
        self.model, self.temperature = args.model, args.temperature
        self.malformed_retries, self.delay = args.max_retries, args.retry_delay

    def scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def ask(self, prompt: str) -> list[str]:
        for attempt in range(self.malformed_retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, temperature=self.temperature,
                    messages=[{"role": "user", "content": prompt}])
                content = reply.choices[0].message.content
                if isinstance(content, str) and self.key and self.key in content:
                    # an endpoint that echoes the request (a proxy, a test server, a hostile one):
                    # nothing it says is a description, and the key must never reach a file
                    raise RaftError("the endpoint's answer contains your API key: refused, nothing of it was "
                                    "written (is --base-url an echo server or a misconfigured proxy?)")
                sentences = parse_sentences(content) if isinstance(content, str) else []
                if sentences:
                    return sentences
                problem = "an empty or malformed answer"
            except self.openai.APIStatusError as exc:
                if exc.status_code in (400, 401, 403, 404):
                    raise RaftError(f"the endpoint refused the request ({exc.status_code}): "
                                    f"{self.scrub(str(exc))[:300]}") from None
                problem = f"HTTP {exc.status_code} after the client's retries"
            except self.openai.APIConnectionError as exc:   # its cause says what happened (a bound, a refusal)
                problem = f"no answer ({self.scrub(str(exc.__cause__ or exc))[:200]}) after the client's retries"
            except (AttributeError, IndexError, KeyError, TypeError, ValueError, self.openai.APIError) as exc:
                problem = f"an unparseable answer ({type(exc).__name__})"
            if attempt < self.malformed_retries:
                wait = self.delay * 2 ** attempt
                print(f"  got {problem}; asking again in {wait:.1f}s", file=sys.stderr)
                time.sleep(wait)
        raise RaftError(f"no usable answer after {self.malformed_retries + 1} attempts: the last was {problem}")


def describe(asker: Asker, classname: str, questions: list[str], n: int) -> list[str]:
    """``n`` distinct descriptions of a class, from the questions in turn."""
    readable = classname.replace("_", " ")
    found: list[str] = []
    for _ in range(3):  # a few rounds if answers are short or repeat
        for q in questions:
            need = n - len(found)
            if need <= 0:
                return found[:n]
            prompt = q.format(readable) + " " + INSTRUCTION.format(k=max(need, 1), c=readable)
            for s in asker.ask(prompt):
                if s not in found:
                    found.append(s)
    return found[:n]


def main(argv: list[str] | None = None):
    parser = ToolParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--classes", nargs="+", help="class names")
    source.add_argument("--classnames", help="a text file with one class name per line")
    source.add_argument("--config", help="a dataset config: its class names are read from the dataset")
    parser.add_argument("--data_path", help="with --config: override the dataset location")
    parser.add_argument("--name", help="output name: gpt3_file/<name>_prompt.json (default: the dataset's)")
    parser.add_argument("--out", help="output file (default gpt3_file/<name>_prompt.json)")
    parser.add_argument("--question", action="append", help=f"question template, repeatable (default: "
                                                            f"'{DEFAULT_QUESTION}')")
    parser.add_argument("--n", type=bounded(int, 1, 100), default=10, help="descriptions per class (1 to 100)")
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
                        help="the chat model ($OPENAI_MODEL, else gpt-4o-mini)")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                        help="any OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI's)")
    parser.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY (prefer the variable: "
                                                        "command lines are visible to other users)")
    parser.add_argument("--temperature", type=bounded(float, 0, 2), default=0.8, help="sampling temperature (0 to 2)")
    parser.add_argument("--max-retries", type=bounded(int, 0, 20), default=5,
                        help="retries of a request that timed out, was rate-limited (429) or failed (5xx)")
    parser.add_argument("--retry-delay", type=bounded(float, 0, 600), default=2.0,
                        help="first back-off for malformed answers (s)")
    parser.add_argument("--timeout", type=bounded(float, 0.1, 3_600), default=60.0,
                        help="seconds a request may take in all, its answer read to the end")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise RaftError("--n must be at least 1")
    questions = args.question or [DEFAULT_QUESTION]
    for question in questions:
        check_template(question, "--question")
    name, classes = class_names(args)
    if not name and not args.out:
        raise RaftError("give --name (or --out) for the output file")
    out = Path(args.out) if args.out else ROOT / "gpt3_file" / f"{name}_prompt.json"
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise RaftError("no API key: set OPENAI_API_KEY (or pass --api-key)")
    done = load_descriptions(out) if out.is_file() else {}  # resume: keep what is there
    todo = [c for c in classes if len([s for s in done.get(c.replace("_", " "), []) if isinstance(s, str)
                                       and s.strip()]) < args.n]
    print(f"{len(classes)} classes, {len(classes) - len(todo)} already described in {out}; "
          f"asking {args.model} for {args.n} descriptions each of {len(todo)}")
    asker = Asker(args, api_key)
    short = []
    for i, c in enumerate(todo, 1):
        sentences = describe(asker, c, questions, args.n)
        if len(sentences) < args.n:
            short.append(c)
        done[c.replace("_", " ")] = sentences  # keys with spaces, as the CaFo files
        write_json(out, done)
        print(f"[{i}/{len(todo)}] {c}: {len(sentences)} descriptions")
    print(f"written: {out}")
    if short:
        print(f"warning: fewer than {args.n} distinct descriptions for {', '.join(short)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
