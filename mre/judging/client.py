"""A resilient client for judge requests: send a chat request body, validate the reply with a
parser, retry what is transient, re-ask what is malformed.

    endpoint = Endpoint(provider="openai")                  # key from OPENAI_API_KEY, never logged
    judge = JudgeClient.from_endpoint(endpoint, RetryPolicy(max_attempts=8))
    body = prompts.chat_request("gpt-4o", "evaluation", "following", instruction, original, edited)
    reply = judge.ask(body, functools.partial(prompts.parse_evaluation_reply, "following"))
    if reply.ok:
        reply.value      # what the parser returned
    else:
        reply.error      # why it failed (rejected request, gave up on transport faults, or
                         # malformed replies after the re-asks)
    reply.texts, reply.usage   # every raw reply text received and the tokens they cost

Failure handling, by cause:
  429 (rate limit), 408, 409, 5xx, timeouts, connection errors, unreadable 200 bodies (truncated or
      not JSON, or not a chat completion):  retried with exponential backoff and jitter, honouring
      the server's Retry-After; the total wait per request is capped.
      Exhausted -> the request *gives up* and waits for evidence (see EndpointHealth). The endpoint
      answering other requests meanwhile (or, when none is left trying, the last request it
      answered, sent again) makes it this item's problem: `ask` returns a failed Reply saying why,
      and the run goes on. If the probe gets no answer either (or nothing was ever answered), the
      endpoint looks down: `JudgeUnavailable` is raised by the waiting and every later request,
      so the run stops (and resumes later) rather than mark items failed.
  401, 403, 404 and 429 "insufficient_quota":  `JudgeConfigError` at once (a wrong key, endpoint or
      deployment, or no credit: retrying cannot help).
  other 4xx (e.g. a request the model refuses):  the reply fails with the API's message.
  200 with a reply the parser rejects (or an empty one):  re-asked `reasks` times, then the reply
      fails with the parser's message. A parser raises ValueError for anything it rejects, however
      strange the reply (mre.judging.prompts does).

The retry loop is ours (the openai client is built with max_retries=0) so that it can be tested
and counted (`JudgeClient.stats`). Every message that leaves this module has the API key blanked.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import email.utils
import functools
import json
import logging
import random
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import openai
from openai.types.chat import ChatCompletion

from mre.judging.endpoint import DEFAULT_MODEL, PROVIDERS, Endpoint
from mre.judging.errors import JudgeConfigError, JudgeError, JudgeStopped, JudgeUnavailable
from mre.judging.health import EndpointHealth
from mre.judging.replies import Reply, Usage, kept_text, reply_text

__all__ = [  # the client's whole interface, wherever each piece is defined
    "DEFAULT_MODEL",
    "PROVIDERS",
    "Endpoint",
    "JudgeClient",
    "JudgeConfigError",
    "JudgeError",
    "JudgeStopped",
    "JudgeUnavailable",
    "Reply",
    "RequestRejected",
    "RetryPolicy",
    "Usage",
    "run_concurrently",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

# Status codes worth retrying: timeouts, conflicts (OpenAI answers 409 to some overloads), rate
# limits and server errors.
_TRANSIENT_STATUS = {408, 409, 429}
_CONFIG_STATUS = {401, 403, 404}


class RequestRejected(Exception):
  """The API refused this one request (a 4xx other than auth/not-found); other requests may pass."""

  def __init__(self, message: str, attempts: int = 1):
    super().__init__(message)
    self.attempts = attempts


class _GaveUp(Exception):
  """One request's attempts (or its wait budget) ran out on transient faults."""

  def __init__(self, message: str, attempts: int):
    super().__init__(message)
    self.attempts = attempts


class _UnreadableBody(Exception):
  """A 200 answer whose body is not a chat completion (a proxy's page, a cut-off body)."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  max_attempts: int = 8  # HTTP attempts per request, the first included
  initial_delay: float = 1.0  # seconds before the first retry (without Retry-After)
  max_delay: float = 60.0  # longest single wait
  max_total_wait: float = 900.0  # most seconds one request may spend waiting between attempts
  reasks: int = 2  # new requests after a reply the parser rejects

  def __post_init__(self):
    if self.max_attempts < 1 or self.reasks < 0:
      raise ValueError("max_attempts must be >= 1 and reasks >= 0")
    if min(self.initial_delay, self.max_delay, self.max_total_wait) < 0:
      raise ValueError("delays must be >= 0")

  def backoff(self, retry: int, u: float) -> float:
    """Wait before retry number `retry` (1, 2, ...) for a uniform draw u in [0, 1): exponential,
    with "equal jitter" (the upper half of the range) so that clients throttled together do not
    all come back together."""
    ceiling = min(self.max_delay, self.initial_delay * 2.0 ** (retry - 1))
    return ceiling * (0.5 + 0.5 * u)


class JudgeClient:
  """Thread-safe: one instance serves all worker threads of a run.

  evidence_grace: seconds a request that gave up waits for other requests to start when none is
  in flight (see EndpointHealth); the workers of a run start their next request within milliseconds.
  """

  def __init__(
      self,
      client: openai.OpenAI,
      policy: RetryPolicy = RetryPolicy(),
      *,
      where: str = "the judge",
      secrets: Iterable[str] = (),
      seed: Optional[int] = None,
      sleep: Optional[Callable[[float], None]] = None,
      evidence_grace: float = 1.0,
  ):
    self.openai = client.with_options(max_retries=0)
    self.policy = policy
    self.where = where
    self._secrets = [s for s in secrets if s and len(s) >= 4]
    self._rng = random.Random(seed)
    self._rng_lock = threading.Lock()
    self._stop = threading.Event()
    self._sleep = sleep
    self._health = EndpointHealth(where, evidence_grace)
    self._answered_body: Optional[dict] = None  # the last request answered, for probing
    self._stats_lock = threading.Lock()
    self.stats: collections.Counter = collections.Counter()

  @classmethod
  def from_endpoint(
      cls, endpoint: Endpoint, policy: RetryPolicy = RetryPolicy(), **kwargs
  ) -> "JudgeClient":
    key = endpoint.api_key()
    return cls(endpoint.create_client(), policy, where=endpoint.describe(), secrets=[key], **kwargs)

  # --- one question --------------------------------------------------------------------------

  def ask(self, body: dict, parse: Callable[[str], T], reasks: Optional[int] = None) -> Reply[T]:
    """Sends a /chat/completions body and parses the reply text with `parse` (which raises
    ValueError for a reply it rejects), re-asking malformed replies up to `reasks` times.

    Raises JudgeError subclasses for run-stopping problems (endpoint down, bad key); everything
    about this one question (a rejected request, a request that gave up while the endpoint
    answered others, replies the parser keeps rejecting) comes back in the Reply.
    """
    reasks = self.policy.reasks if reasks is None else reasks
    texts, usage, requests, problems = [], Usage(), 0, []
    for ask in range(reasks + 1):
      if ask:
        self._count("reasks")
      try:
        completion, sent = self._request(body)
      except (RequestRejected, _GaveUp) as error:
        return Reply(None, tuple(texts), usage, self.redact(str(error)), requests + error.attempts)
      requests += sent
      usage += Usage.of(getattr(completion, "usage", None))
      text, problem = reply_text(completion)
      if text is not None:
        texts.append(kept_text(text))
        try:
          return Reply(parse(text), tuple(texts), usage, None, requests)
        except ValueError as error:
          problem = str(error)
      problems.append(problem)
      log.debug("judge reply rejected (%s); %d re-asks left", problem, reasks - ask)
    error = f"no valid reply in {reasks + 1} asks; last: {problems[-1]}"
    return Reply(None, tuple(texts), usage, self.redact(error), requests)

  def _request(self, body: dict) -> tuple[ChatCompletion, int]:
    """One chat completion with retries; _GaveUp when this request alone keeps failing."""
    self._health.enter()
    try:
      completion, attempts = self._attempts(self._create, (), body)
      self._answered_body = body
      return completion, attempts
    except _GaveUp as error:
      gave_up = error
    finally:
      self._health.leave()
    self._count("gave_up")
    log.warning("%s: a request gave up: %s", self.where, self.redact(str(gave_up)))
    probe = (
        None if self._answered_body is None else functools.partial(self._probe, self._answered_body)
    )
    self._health.gave_up(
        self.redact(str(gave_up)), self._stop, probe
    )  # raises if the endpoint looks down
    raise gave_up

  def _probe(self, body: dict) -> bool:
    """Is the endpoint up? `body`, which it answered before, sent again (with retries)."""
    self._count("probes")
    try:
      self._attempts(self._create, (), body)
    except _GaveUp:
      return False
    except RequestRejected:
      pass  # an answer all the same
    return True

  def _create(self, **body) -> ChatCompletion:
    completion = self.openai.chat.completions.create(**body)
    # The openai client returns the body as it came when its content type is not JSON (an HTML
    # error page from a proxy), or a bare JSON value that is not an object.
    if not isinstance(completion, ChatCompletion):
      raise _UnreadableBody(
          f"the 200 answer is a {type(completion).__name__}, not a chat completion"
      )
    return completion

  # --- any API call ----------------------------------------------------------------------------

  def call(self, fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, int]:
    """fn(*args, **kwargs) with the retry policy; returns (result, HTTP attempts made).

    For the Files and Batches calls of Batch API mode: no item owns them, so giving up raises
    JudgeUnavailable.
    """
    self._health.enter()
    try:
      return self._attempts(fn, args, kwargs)
    except _GaveUp as error:
      raise JudgeUnavailable(
          self.redact(f"cannot get an answer from {self.where}: {error}")
      ) from None
    finally:
      self._health.leave()

  def _attempts(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, int]:
    waited, last = 0.0, "no attempt"
    for attempt in range(1, self.policy.max_attempts + 1):
      if self._stop.is_set():
        raise JudgeStopped("stopped")
      self._count("requests")
      try:
        result = fn(*args, **kwargs)
      except openai.APIConnectionError as error:  # timeouts included; a body cut off mid-read too
        kind = "timeout" if isinstance(error, openai.APITimeoutError) else "connection"
        last, retry_after = f"{kind} error ({error})", None
      except openai.APIResponseValidationError as error:  # a garbled body, e.g. from a proxy
        kind, last, retry_after = "invalid_response", f"invalid response ({error})", None
      # A 200 whose body ends early (the openai client raises JSONDecodeError), is nested too
      # deeply to decode, or is not a chat completion: a transport fault, like a disconnect.
      except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, _UnreadableBody) as error:
        kind, last, retry_after = (
            "bad_body",
            f"unreadable 200 answer, truncated? ({_short(error)})",
            None,
        )
      except openai.APIStatusError as error:
        status = error.status_code
        message = self.redact(_api_message(error))
        if status == 429 and _error_code(error) == "insufficient_quota":
          raise JudgeConfigError(
              f"{self.where}: out of quota (429 insufficient_quota): {message}"
          ) from None
        if status in _CONFIG_STATUS:
          raise JudgeConfigError(f"{self.where} answered {status}: {message}") from None
        if status not in _TRANSIENT_STATUS and status < 500:
          self._health.answered()  # it refused this request, but it is up
          self._count(f"rejected_{status}")
          raise RequestRejected(
              f"the API rejected the request ({status}): {message}", attempt
          ) from None
        kind, last, retry_after = (
            str(status),
            f"HTTP {status} ({message})",
            _retry_after(error.response),
        )
      else:
        self._health.answered()
        return result, attempt
      self._count(f"retry_{kind}")
      if attempt == self.policy.max_attempts:
        break
      # A server's Retry-After is honoured (plus up to 10%, so that the threads it throttled
      # together spread out), up to max_delay.
      u = self._uniform()
      delay = (
          self.policy.backoff(attempt, u)
          if retry_after is None
          else min(self.policy.max_delay, retry_after * (1.0 + 0.1 * u))
      )
      if waited + delay > self.policy.max_total_wait:
        break
      log.debug("%s: %s; retry %d in %.2f s", self.where, last, attempt, delay)
      self._wait(delay)
      waited += delay
    raise _GaveUp(
        self.redact(
            f"no answer after {attempt} attempt(s) and {waited:.1f} s of waiting; "
            f"last error: {last}"
        ),
        attempt,
    )

  # --- control ---------------------------------------------------------------------------------

  def stop(self) -> None:
    """Makes waiting and future requests raise JudgeStopped (e.g. on Ctrl-C or a fatal error)."""
    self._stop.set()

  def redact(self, text: str) -> str:
    for secret in self._secrets:
      text = text.replace(secret, "***")
    return text

  def _wait(self, seconds: float) -> None:
    if self._sleep is not None:
      self._sleep(seconds)
    elif self._stop.wait(seconds):
      raise JudgeStopped("stopped")

  def _uniform(self) -> float:
    with self._rng_lock:  # random.Random is not documented as thread-safe
      return self._rng.random()

  def _count(self, name: str) -> None:
    with self._stats_lock:
      self.stats[name] += 1


def _short(error: BaseException) -> str:
  return str(error)[:200]


def _api_message(error: openai.APIStatusError) -> str:
  body = error.body
  if isinstance(body, dict):
    inner = body.get("error", body)
    if isinstance(inner, dict) and inner.get("message"):
      return str(inner["message"])
  return str(error.message)


def _error_code(error: openai.APIStatusError) -> Optional[str]:
  body = error.body
  inner = body.get("error", body) if isinstance(body, dict) else None
  code = (inner.get("code") or inner.get("type")) if isinstance(inner, dict) else None
  return code or getattr(error, "code", None)


def _retry_after(response) -> Optional[float]:
  """Seconds the server asks to wait: `retry-after-ms`, else `Retry-After` (seconds or a date)."""
  headers = getattr(response, "headers", None) or {}
  try:
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
      return max(0.0, float(milliseconds) / 1000.0)
  except ValueError:
    pass
  value = headers.get("retry-after")
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    try:
      return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
      return None


def run_concurrently(
    fn: Callable[[T], Any], items: Iterable[T], concurrency: int
) -> Iterator[tuple[T, concurrent.futures.Future]]:
  """fn(item) on `concurrency` threads; yields (item, finished future) in completion order.

  Items are drawn from `items` only as threads free up (so a 20K-item source is never held in
  memory at once). Closing the generator early cancels the items not yet started and waits for
  the running ones (call JudgeClient.stop() first to cut their retries short).
  """
  if concurrency < 1:
    raise ValueError(f"concurrency must be >= 1, got {concurrency}")
  iterator = iter(items)
  with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="judge") as pool:
    running: dict[concurrent.futures.Future, T] = {}
    try:
      while True:
        while len(running) < concurrency:
          item = next(iterator, _END)
          if item is _END:
            break
          running[pool.submit(fn, item)] = item
        if not running:
          return
        finished, _ = concurrent.futures.wait(
            running, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in finished:
          yield running.pop(future), future
    finally:
      for future in running:
        future.cancel()


_END = object()
