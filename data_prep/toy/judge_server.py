"""The toy judge behind an OpenAI-compatible HTTP API, so the annotator and the evaluator run
unchanged against it or against GPT-4o.

    python -m data_prep.toy.judge_server --port 8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="toy")

Endpoints (127.0.0.1 only, no authentication):
  POST /v1/chat/completions     one judge request built by `mre.judging.prompts` (one perspective);
                                the reply is the annotation JSON or the evaluation dict string.
  POST /v1/files                multipart upload (purpose, file)
  GET  /v1/files/{id}           file object;  GET /v1/files/{id}/content: the bytes
  POST /v1/batches              runs every line of an uploaded JSONL in the background
  GET  /v1/batches/{id}         batch object (status, output_file_id, error_file_id, counts)
  GET  /v1/models               the one model

`Faults` makes chat completions fail on purpose, to test clients: at seeded rates per kind (see
FAULT_KINDS: HTTP errors, disconnects, truncated bodies, slow answers, malformed answers of many
sorts, and right answers in odd wrappings), on a seeded share of requests that fail the same way
every time they are asked ("persistent"), or on requests a test chooses. The fault kinds live in
`data_prep.toy.judge_faults`, the answers themselves in `data_prep.toy.judge_answers`; both are
importable from here. Requests are answered through this module's `answer_chat`, so a test may
replace it (monkeypatch) to spoil chosen answers, online and in batches alike.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import hashlib
import http.server
import json
import re
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

import numpy as np
from absl import app, flags

from data_prep.toy.judge_batches import FilesAndBatches
from data_prep.toy.judge_answers import RequestError, answer_chat, completion_body, error_body
from data_prep.toy.judge_faults import (
    ANSWER_FAULTS,
    BENIGN_FAULTS,
    FAULT_KINDS,
    PERSISTENT_KINDS,
    TRANSPORT_FAULTS,
    ChatRequest,
    Faults,
    describe_request,
    faulty_reply,
    image_digest,
)
from mre.judging import prompts

__all__ = [  # what tests and the evaluator use, wherever it is defined
    "ANSWER_FAULTS",
    "BENIGN_FAULTS",
    "FAULT_KINDS",
    "MODEL",
    "PERSISTENT_KINDS",
    "TRANSPORT_FAULTS",
    "ChatRequest",
    "Faults",
    "JudgeServer",
    "RequestError",
    "answer_chat",
    "completion_body",
    "describe_request",
    "error_body",
    "faulty_reply",
    "image_digest",
    "serve_in_thread",
]

MODEL = "toy-judge"


class JudgeServer(FilesAndBatches, http.server.ThreadingHTTPServer):
  """A threaded HTTP server holding the uploaded files and batches in memory."""

  model_name = MODEL

  daemon_threads = True

  def __init__(self, host: str = "127.0.0.1", port: int = 0, faults: Optional[Faults] = None):
    super().__init__((host, port), _Handler)
    self.faults = faults or Faults()
    self._fault_rng = np.random.default_rng(self.faults.seed)
    self._lock = threading.Lock()
    self.files: dict[str, dict] = {}
    self.batches: dict[str, dict] = {}
    self._asked: dict[str, int] = {}  # request key -> times asked
    self._last_id: Optional[str] = None  # for duplicate_id
    # Chat requests received, faults injected per kind, and "persistent": requests answered by a
    # persistent fault (each also counted under its kind).
    self.counts = {"requests": 0, "persistent": 0, **{kind: 0 for kind in FAULT_KINDS}}
    self.persistent_questions: set[tuple] = set()  # (edited digest, perspective) that always fail

  def handle_error(self, request, client_address):
    # A client that hangs up (killed, or timed out) is routine here: tests kill clients on purpose.
    if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
      super().handle_error(request, client_address)

  @property
  def base_url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/v1"

  def describe(self, body, raw: bytes) -> ChatRequest:
    """The ChatRequest of a chat body, counting how often this exact body came."""
    key = hashlib.sha256(raw).hexdigest()
    with self._lock:
      self._asked[key] = attempt = self._asked.get(key, 0) + 1
    return ChatRequest(*describe_request(body), key, attempt)

  def draw_fault(self, request: Optional[ChatRequest] = None) -> Optional[str]:
    """The fault for this request (None: answer it well), counted. Without a request (a body
    that is not JSON) only the rates apply."""
    persistent = self._persistent_kind(request.key) if request is not None else None
    chosen = None
    if persistent is None and self.faults.choose is not None and request is not None:
      chosen = self.faults.choose(request)  # outside the lock: a test's function may be slow
      if chosen is not None and chosen not in FAULT_KINDS:
        raise ValueError(f"choose() returned {chosen!r}, not one of {FAULT_KINDS}")
    with self._lock:
      self.counts["requests"] += 1
      u = self._fault_rng.random()  # drawn for every request, so a seed gives one sequence
      kind = persistent or chosen
      if kind is None and self.faults.choose is None:
        for name, rate in self.faults.rates().items():
          if u < rate:
            kind = name
            break
          u -= rate
      if persistent is not None:
        self.counts["persistent"] += 1
        self.persistent_questions.add((request.edited, request.perspective))
      if kind is not None:
        self.counts[kind] += 1
      return kind

  def _persistent_kind(self, key: str) -> Optional[str]:
    """The fault a persistently failing request always gets, by a seeded hash of its key."""
    if not self.faults.persistent:
      return None
    digest = hashlib.sha256(f"{self.faults.seed}:{key}".encode()).digest()
    if int.from_bytes(digest[:8], "big") / 2.0**64 >= self.faults.persistent:
      return None
    return PERSISTENT_KINDS[digest[8] % len(PERSISTENT_KINDS)]

  def spoil(self, kind: str, reply: str, request: Optional[ChatRequest]) -> str:
    with self._lock:
      pick = int(self._fault_rng.integers(1 << 16))
    return faulty_reply(kind, reply, request.form if request else None, pick)

  def completion_id(self, duplicate: bool) -> str:
    """A fresh completion id, or (duplicate) the last one served."""
    with self._lock:
      if not (duplicate and self._last_id):
        self._last_id = "chatcmpl-" + uuid.uuid4().hex[:24]
      return self._last_id

  def answer(self, body) -> tuple:
    """One chat request answered through this module's `answer_chat` (tests may replace it),
    online and in batches alike."""
    return answer_chat(body)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
  server: JudgeServer

  def log_message(self, format, *args):  # quiet: tests start many requests
    del format, args

  def do_GET(self):
    self._route("GET")

  def do_POST(self):
    self._route("POST")

  def _route(self, method: str):
    path = self.path.split("?", 1)[0].rstrip("/")
    try:
      body = self._read_body()
      if method == "POST" and path == "/v1/chat/completions":
        return self._chat(body)
      if method == "POST" and path == "/v1/files":
        return self._send_json(200, self._upload(body))
      if method == "POST" and path == "/v1/batches":
        return self._send_json(200, self.server.create_batch(_json(body)))
      if method == "GET" and path == "/v1/models":
        return self._send_json(
            200,
            {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "mre"}],
            },
        )
      match = re.fullmatch(r"/v1/files/(?P<id>[\w-]+)(?P<content>/content)?", path)
      if method == "GET" and match:
        file = self.server.file(match["id"])
        if match["content"]:
          return self._send(200, file["data"], "application/octet-stream")
        return self._send_json(200, {k: v for k, v in file.items() if k != "data"})
      match = re.fullmatch(r"/v1/batches/(?P<id>[\w-]+)", path)
      if method == "GET" and match:
        return self._send_json(200, self.server.batch(match["id"]))
      raise RequestError(404, f"unknown endpoint {method} {path}")
    except RequestError as error:
      self._send_json(error.status, error_body(error.message, error.kind))
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True  # the client gave up (e.g. timed out): nobody to answer
    except Exception as error:  # a server bug must still answer, not hang the client
      self._send_json(500, error_body(f"internal error: {error!r}", "server_error"))

  def _read_body(self) -> bytes:
    length = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(length) if length else b""

  def _chat(self, raw: bytes):
    try:
      body = _json(raw)
    except RequestError:
      self.server.draw_fault()  # counted, so that requests == the requests a client sent
      raise
    request = self.server.describe(body, raw)
    fault = self.server.draw_fault(request)
    retry_after = self.server.faults.retry_after_seconds
    retry_headers = {
        "retry-after-ms": str(int(round(retry_after * 1000))),
        "Retry-After": str(max(1, int(np.ceil(retry_after)))),
    }
    statuses = {
        "rate_limit": (429, "Rate limit reached", "rate_limit_error"),
        "server_error": (500, "The server had an error", "server_error"),
        "unavailable": (503, "The engine is currently overloaded", "server_error"),
    }
    if fault in statuses:
      status, message, kind = statuses[fault]
      return self._send_json(
          status, error_body(f"{message} (injected fault).", kind), retry_headers
      )
    if fault == "disconnect":
      self.close_connection = True  # hang up without a word
      return
    if fault == "slow":
      time.sleep(self.server.faults.slow_seconds)
    reply, usage = answer_chat(body)
    if fault in ANSWER_FAULTS or fault in BENIGN_FAULTS:
      reply = self.server.spoil(fault, reply, request)
    completion = completion_body(
        reply,
        usage,
        body.get("model") or MODEL,
        self.server.completion_id(duplicate=fault == "duplicate_id"),
    )
    data = json.dumps(completion).encode()
    if fault == "truncated":
      data = data[: len(data) // 2]
    self._send(200, data, "application/json")

  def _upload(self, raw: bytes) -> dict:
    content_type = self.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data"):
      raise RequestError(400, "file uploads must be multipart/form-data")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    fields, upload = {}, None
    for part in message.iter_parts():
      name = part.get_param("name", header="content-disposition")
      if name == "file":
        upload = (part.get_filename() or "upload.jsonl", part.get_payload(decode=True) or b"")
      elif name:
        fields[name] = (part.get_payload(decode=True) or b"").decode()
    if upload is None:
      raise RequestError(400, "the upload has no 'file' part")
    if not fields.get("purpose"):
      raise RequestError(400, "the upload has no 'purpose' field")
    return self.server.add_file(upload[1], upload[0], fields["purpose"])

  def _send_json(self, status: int, payload: dict, headers: Optional[dict] = None):
    self._send(status, json.dumps(payload).encode(), "application/json", headers)

  def _send(self, status: int, data: bytes, content_type: str, headers: Optional[dict] = None):
    if self.wfile.closed:
      return
    try:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(data)))
      for key, value in (headers or {}).items():
        self.send_header(key, value)
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True


def _json(raw: bytes):
  try:
    return json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise RequestError(400, f"the request body is not valid JSON ({error})") from None


@contextlib.contextmanager
def serve_in_thread(
    port: int = 0, faults: Optional[Faults] = None, host: str = "127.0.0.1"
) -> Iterator[JudgeServer]:
  """Runs a JudgeServer in a background thread (port 0: a free one) for the `with` block.

  with serve_in_thread() as server:
      client = openai.OpenAI(base_url=server.base_url, api_key="toy")
  """
  server = JudgeServer(host, port, faults)
  thread = threading.Thread(
      target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
  )
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


FLAGS = flags.FLAGS
flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
flags.DEFINE_integer("port", 8000, "port to listen on (0: any free port)")
for _kind in FAULT_KINDS:
  flags.DEFINE_float(
      f"{_kind}_rate", 0.0, f"share of chat requests answered with the {_kind} fault"
  )
flags.DEFINE_float(
    "fault_rate",
    0.0,
    "share of chat requests faulty, spread evenly over every fault kind "
    "(instead of the per-kind rates)",
)
flags.DEFINE_float(
    "persistent_rate", 0.0, "share of distinct requests that fail the same way every time"
)
flags.DEFINE_float("slow_seconds", 2.0, "delay of a slow reply")
flags.DEFINE_float("retry_after_seconds", 0.01, "Retry-After sent with 429, 500 and 503")
flags.DEFINE_integer("fault_seed", 0, "seed of the fault draws")


def main(argv):
  del argv
  options = dict(
      persistent=FLAGS.persistent_rate,
      slow_seconds=FLAGS.slow_seconds,
      retry_after_seconds=FLAGS.retry_after_seconds,
      seed=FLAGS.fault_seed,
  )
  rates = {kind: FLAGS[f"{kind}_rate"].value for kind in FAULT_KINDS}
  if FLAGS.fault_rate and any(rates.values()):
    raise app.UsageError("give --fault_rate or per-kind rates (--<kind>_rate), not both")
  faults = (
      Faults.spread(FLAGS.fault_rate, **options) if FLAGS.fault_rate else Faults(**rates, **options)
  )
  server = JudgeServer(FLAGS.host, FLAGS.port, faults)
  print(f"toy judge (prompts {prompts.PROMPT_VERSION}) serving at {server.base_url}", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  app.run(main)
