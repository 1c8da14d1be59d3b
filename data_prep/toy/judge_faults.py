"""Faults the toy judge server injects into chat completions, to test clients.

Every kind a client meets (FAULT_KINDS): transport faults it must retry, malformed answers it must
reject and ask again, and right answers in odd wrappings it must accept. `Faults` says which
requests get which: seeded rates per kind, a seeded share of requests that fail the same way every
time they are asked ("persistent"), or a test's own choice per request (`ChatRequest`).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from typing import Callable, Optional

from mre.judging import prompts


# Every kind of injected fault, by what a client has to do about it.
TRANSPORT_FAULTS = (
    "rate_limit",  # 429 with Retry-After
    "server_error",  # 500
    "unavailable",  # 503
    "disconnect",  # the connection closes without an answer
    "truncated",  # 200 whose JSON body stops halfway (Content-Length fits the cut body)
    "slow",  # the answer comes after `slow_seconds` (a timeout for an impatient client)
)
ANSWER_FAULTS = (  # 200 with an answer the client must reject and ask again
    "malformed",  # prose without an answer, or broken JSON
    "missing_score",
    "out_of_range",  # a score of 7.5
    "worded_score",  # "score": "high"
    "bool_score",  # "score": true
    "quoted_score",  # "score": "3.5"
    "nested",  # a score nested thousands of lists deep
    "empty",  # an empty message
)
BENIGN_FAULTS = (  # the right answer in an unusual wrapping: a client must accept it
    "prose",  # the answer inside prose and a code fence
    "duplicate_id",  # the completion id of an earlier reply
)
FAULT_KINDS = TRANSPORT_FAULTS + ANSWER_FAULTS + BENIGN_FAULTS
# What a persistently failing request does every time (benign and slow ones are no failure).
PERSISTENT_KINDS = (
    "rate_limit",
    "server_error",
    "unavailable",
    "disconnect",
    "truncated",
    "malformed",
    "out_of_range",
    "bool_score",
    "quoted_score",
    "nested",
)
_NESTING = 5_000  # lists deep: far past json's recursion limit, and within prompts.MAX_REPLY_CHARS


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """What a fault chooser sees of one chat request."""

  form: Optional[str]  # annotation | evaluation (None: not a prompt of mre.judging.prompts)
  perspective: Optional[str]
  instruction: Optional[str]
  edited: Optional[str]  # image_digest of the last image (the edited one), which tells items apart
  key: str  # a digest of the request body: the same question asked again has the same key
  attempt: int  # 1 the first time this body arrives, 2 the next, ...


def describe_request(body) -> tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
  """(form, perspective, instruction, edited image digest) of a chat body; None where it is not a
  request of mre.judging.prompts (answer_chat gives those their 400)."""
  form = perspective = instruction = edited = None
  try:
    parts = [
        part
        for message in body["messages"]
        if message.get("role") == "user"
        for part in (
            [{"type": "text", "text": message["content"]}]
            if isinstance(message["content"], str)
            else message["content"]
        )
    ]
    images = [part["image_url"]["url"] for part in parts if part.get("type") == "image_url"]
    if images:
      edited = image_digest(prompts.data_url_bytes(images[-1]))
    form, perspective, instruction = prompts.identify(
        "\n".join(part["text"] for part in parts if part.get("type") == "text")
    )
  except (KeyError, TypeError, AttributeError, ValueError):
    pass
  return form, perspective, instruction, edited


def image_digest(image) -> str:
  """The digest by which ChatRequest.edited names an image (an array, PIL image or PNG bytes)."""
  return hashlib.sha256(prompts.data_url_bytes(prompts.image_data_url(image))).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Faults:
  """Injected faults on chat completions, drawn from a seeded generator.

  Rates (0..1) per kind of FAULT_KINDS (fields of the same names), summing to at most 1.
  `persistent`: the share of distinct requests (by body) that fail with one of PERSISTENT_KINDS
  every time they are asked, chosen by a seeded hash. `choose(request)`: a test's own choice, a
  kind or None, for a ChatRequest (it overrides the rates; persistent requests stay persistent).

  429, 500 and 503 carry `retry-after-ms` / `Retry-After` headers of `retry_after_seconds`, which
  the openai client honours instead of its own backoff, so tests with many retries stay fast.
  """

  rate_limit: float = 0.0
  server_error: float = 0.0
  unavailable: float = 0.0
  disconnect: float = 0.0
  truncated: float = 0.0
  slow: float = 0.0
  malformed: float = 0.0
  missing_score: float = 0.0
  out_of_range: float = 0.0
  worded_score: float = 0.0
  bool_score: float = 0.0
  quoted_score: float = 0.0
  nested: float = 0.0
  empty: float = 0.0
  prose: float = 0.0
  duplicate_id: float = 0.0
  persistent: float = 0.0
  slow_seconds: float = 2.0
  retry_after_seconds: float = 0.01
  seed: int = 0
  choose: Optional[Callable[[ChatRequest], Optional[str]]] = None

  def __post_init__(self):
    rates = self.rates()
    if (
        any(not 0.0 <= r <= 1.0 for r in [*rates.values(), self.persistent])
        or sum(rates.values()) > 1.0
    ):
      raise ValueError(
          f"fault rates must be in [0, 1] and sum to at most 1, got {rates} "
          f"and persistent {self.persistent}"
      )

  def rates(self) -> dict[str, float]:
    return {kind: getattr(self, kind) for kind in FAULT_KINDS}

  @classmethod
  def spread(cls, rate: float, **options) -> "Faults":
    """`rate` of the requests faulty, in equal shares over every kind of FAULT_KINDS."""
    return cls(**{kind: rate / len(FAULT_KINDS) for kind in FAULT_KINDS}, **options)


_MALFORMED_REPLIES = (
    "I'm sorry, but I can't evaluate this image.",
    '{"score": "high", "failure"',
    "The edit looks mostly fine to me.",
)


def faulty_reply(kind: str, reply: str, form: Optional[str], pick: int = 0) -> str:
  """The judge's `reply` spoilt (or, for BENIGN_FAULTS, rewrapped) the way `kind` says."""
  if kind == "malformed":
    return _MALFORMED_REPLIES[pick % len(_MALFORMED_REPLIES)]
  if kind == "empty":
    return ""
  if kind == "prose":
    return f"Here is my judgement.\n```json\n{reply}\n```\nI hope this helps!"
  if kind == "nested":
    return '{"score": ' + "[" * _NESTING + "]" * _NESTING + ', "failure": "nothing"}'
  if kind == "duplicate_id":
    return reply
  # The rest change the score field of the answer in its own syntax (JSON or a Python dict).
  fields = ast.literal_eval(reply) if form == "evaluation" else json.loads(reply)
  if kind == "missing_score":
    del fields["score"]
  elif kind == "out_of_range":
    fields["score"] = 7.5
  elif kind == "worded_score":
    fields["score"] = "high"
  elif kind == "bool_score":
    fields["score"] = True
  elif kind == "quoted_score":
    fields["score"] = str(fields["score"])
  else:
    raise ValueError(f"{kind!r} is not a fault that changes an answer")
  return repr(fields) if form == "evaluation" else json.dumps(fields)
