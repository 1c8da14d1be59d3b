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
      Exhausted -> the request *gives up* and waits for evidence (see _Health). The endpoint
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
      strange the reply (data_prep.prompts does).

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
import os
import random
import threading
import time
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, TypeVar

import openai
from openai.types.chat import ChatCompletion

T = TypeVar("T")
log = logging.getLogger(__name__)

PROVIDERS = ("openai", "azure", "compatible")
_DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY", "compatible": "OPENAI_API_KEY"}
# Status codes worth retrying: timeouts, conflicts (OpenAI answers 409 to some overloads), rate
# limits and server errors.
_TRANSIENT_STATUS = {408, 409, 429}
_CONFIG_STATUS = {401, 403, 404}
# Reply texts are kept whole in records up to this length (answers are a few dozen characters).
_KEPT_CHARS = 20_000


class JudgeError(Exception):
    """A problem that stops a whole run, not one item."""


class JudgeUnavailable(JudgeError):
    """The endpoint looks down: requests in a row gave up with no answer in between."""


class JudgeConfigError(JudgeError):
    """The endpoint, key, deployment or account is wrong: no retry can help."""


class JudgeStopped(JudgeError):
    """`JudgeClient.stop()` was called while a request waited."""


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


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the judge is: OpenAI, Azure OpenAI, or any OpenAI-compatible server (vLLM, Ollama).

    The API key is read from the environment only: `api_key_env` names the variable (default
    OPENAI_API_KEY, or AZURE_OPENAI_API_KEY for Azure). A compatible server may need no key.
    """

    provider: str = "openai"
    base_url: Optional[str] = None  # openai (optional) and compatible (required)
    azure_endpoint: Optional[str] = None  # https://<resource>.openai.azure.com
    azure_deployment: Optional[str] = None  # the deployment name; sent as the request's model
    api_version: Optional[str] = None  # Azure's api-version, e.g. 2024-10-21
    api_key_env: Optional[str] = None
    timeout: float = 120.0  # seconds per HTTP attempt

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; expected one of {PROVIDERS}")
        if self.provider == "azure" and not (self.azure_endpoint and self.api_version):
            raise ValueError("the azure provider needs azure_endpoint and api_version")
        if self.provider == "compatible" and not self.base_url:
            raise ValueError("the compatible provider needs base_url (e.g. http://localhost:8000/v1)")

    @property
    def key_env(self) -> str:
        return self.api_key_env or _DEFAULT_KEY_ENV[self.provider]

    def api_key(self) -> str:
        key = os.environ.get(self.key_env, "").strip()
        if key:
            return key
        if self.provider == "compatible" and not self.api_key_env:
            return "EMPTY"  # vLLM's and Ollama's convention for "no key"
        raise JudgeConfigError(f"no API key: set the environment variable {self.key_env}")

    @property
    def batch_url(self) -> str:
        """The `url` of Batch API lines and the batch's `endpoint` (Azure leaves out the /v1)."""
        return "/chat/completions" if self.provider == "azure" else "/v1/chat/completions"

    def request_model(self, model: str) -> str:
        """The `model` a request body carries: Azure routes by deployment name."""
        return (self.azure_deployment or model) if self.provider == "azure" else model

    def describe(self) -> str:
        if self.provider == "azure":
            return f"Azure OpenAI {self.azure_endpoint} (deployment {self.azure_deployment}, api {self.api_version})"
        return f"{self.provider} {self.base_url or 'https://api.openai.com/v1'}"

    def create_client(self, **options) -> openai.OpenAI:
        """An openai client that never retries by itself (JudgeClient does)."""
        common = dict(api_key=self.api_key(), timeout=self.timeout, max_retries=0, **options)
        if self.provider == "azure":
            return openai.AzureOpenAI(azure_endpoint=self.azure_endpoint, azure_deployment=self.azure_deployment,
                                      api_version=self.api_version, **common)
        return openai.OpenAI(base_url=self.base_url, **common)


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, usage) -> "Usage":
        """From an API usage object or dict (missing -> zero)."""
        if usage is None:
            return cls()
        get = usage.get if isinstance(usage, dict) else lambda k: getattr(usage, k, None)
        return cls(_tokens(get("prompt_tokens")), _tokens(get("completion_tokens")))

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


def _tokens(value) -> int:
    """A token count from an API answer; anything but a non-negative integer counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclasses.dataclass(frozen=True)
class Reply(Generic[T]):
    """The outcome of one judged question, over all its attempts and re-asks."""

    value: Optional[T]  # the parser's result; None when failed
    texts: tuple[str, ...] = ()  # every reply text received, rejected ones included
    usage: Usage = Usage()  # tokens of every answered request (all are billed)
    error: Optional[str] = None
    requests: int = 0  # HTTP requests sent

    @property
    def ok(self) -> bool:
        return self.error is None


class _Health:
    """Tells a dead endpoint from requests that keep failing on their own (thread-safe).

    A request that gave up waits for evidence. An answer from the endpoint to anything else means
    it works: the request was the problem, and its item fails. When no request is left trying
    (after `grace` seconds, in which the other workers would start their next request), one of the
    waiting requests probes: it sends again the last request the endpoint answered. Answered, the
    waiting requests fail alone; not answered (or nothing ever answered to probe with), the
    endpoint is down, and every waiting and new request raises JudgeUnavailable.
    """

    def __init__(self, where: str, grace: float):
        self.where, self.grace = where, grace
        self._condition = threading.Condition()
        self._answers = 0  # answers received: any response that is not a transient fault
        self._trying = 0  # requests (probes included) sending or waiting between their attempts
        self.down: Optional[str] = None

    def enter(self) -> None:
        with self._condition:
            self._raise_if_down()
            self._trying += 1

    def leave(self) -> None:
        with self._condition:
            self._trying -= 1
            self._condition.notify_all()

    def answered(self) -> None:
        with self._condition:
            self._answers += 1
            self._condition.notify_all()

    def gave_up(self, reason: str, stopped: threading.Event, probe: Optional[Callable[[], bool]]) -> None:
        """After leave(): returns when this request is shown to be the problem, raises
        JudgeUnavailable when the endpoint looks down, JudgeStopped on stop(). probe(): sends the
        last answered request again, True when answered (None: nothing was ever answered)."""
        with self._condition:
            seen, idle_since = self._answers, None
            while self.down is None and self._answers == seen:
                if stopped.is_set():
                    raise JudgeStopped("stopped")
                if self._trying:  # another request (or a probe) may still bring an answer
                    idle_since = None
                else:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= self.grace:
                        if probe is None:
                            self._set_down("it has not answered any request yet")
                        elif not self._probe(probe):
                            self._set_down("requests gave up, and the last request it answered, sent again, "
                                           "got no answer either")
                        continue
                self._condition.wait(0.05)
            self._raise_if_down(reason)

    def _probe(self, probe: Callable[[], bool]) -> bool:
        """probe() outside the lock (it counts as trying, so the other waiters keep waiting)."""
        self._trying += 1
        self._condition.release()
        try:
            return probe()
        finally:
            self._condition.acquire()
            self._trying -= 1
            self._condition.notify_all()

    def _set_down(self, why: str) -> None:
        self.down = f"{self.where} looks down: {why}"
        self._condition.notify_all()

    def _raise_if_down(self, reason: Optional[str] = None) -> None:
        if self.down is not None:
            raise JudgeUnavailable(self.down + (f" (last: {reason})" if reason else ""))


class JudgeClient:
    """Thread-safe: one instance serves all worker threads of a run.

    evidence_grace: seconds a request that gave up waits for other requests to start when none is
    in flight (see _Health); the workers of a run start their next request within milliseconds.
    """

    def __init__(self, client: openai.OpenAI, policy: RetryPolicy = RetryPolicy(), *, where: str = "the judge",
                 secrets: Iterable[str] = (), seed: Optional[int] = None,
                 sleep: Optional[Callable[[float], None]] = None, evidence_grace: float = 1.0):
        self.openai = client.with_options(max_retries=0)
        self.policy = policy
        self.where = where
        self._secrets = [s for s in secrets if s and len(s) >= 4]
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._stop = threading.Event()
        self._sleep = sleep
        self._health = _Health(where, evidence_grace)
        self._answered_body: Optional[dict] = None  # the last request answered, for probing
        self._stats_lock = threading.Lock()
        self.stats: collections.Counter = collections.Counter()

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint, policy: RetryPolicy = RetryPolicy(), **kwargs) -> "JudgeClient":
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
            text, problem = _reply_text(completion)
            if text is not None:
                texts.append(_kept(text))
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
        probe = None if self._answered_body is None else functools.partial(self._probe, self._answered_body)
        self._health.gave_up(self.redact(str(gave_up)), self._stop, probe)  # raises if the endpoint looks down
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
            raise _UnreadableBody(f"the 200 answer is a {type(completion).__name__}, not a chat completion")
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
            raise JudgeUnavailable(self.redact(f"cannot get an answer from {self.where}: {error}")) from None
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
                kind, last, retry_after = "bad_body", f"unreadable 200 answer, truncated? ({_short(error)})", None
            except openai.APIStatusError as error:
                status = error.status_code
                message = self.redact(_api_message(error))
                if status == 429 and _error_code(error) == "insufficient_quota":
                    raise JudgeConfigError(f"{self.where}: out of quota (429 insufficient_quota): {message}") from None
                if status in _CONFIG_STATUS:
                    raise JudgeConfigError(f"{self.where} answered {status}: {message}") from None
                if status not in _TRANSIENT_STATUS and status < 500:
                    self._health.answered()  # it refused this request, but it is up
                    self._count(f"rejected_{status}")
                    raise RequestRejected(f"the API rejected the request ({status}): {message}", attempt) from None
                kind, last, retry_after = str(status), f"HTTP {status} ({message})", _retry_after(error.response)
            else:
                self._health.answered()
                return result, attempt
            self._count(f"retry_{kind}")
            if attempt == self.policy.max_attempts:
                break
            # A server's Retry-After is honoured (plus up to 10%, so that the threads it throttled
            # together spread out), up to max_delay.
            u = self._uniform()
            delay = self.policy.backoff(attempt, u) if retry_after is None else \
                min(self.policy.max_delay, retry_after * (1.0 + 0.1 * u))
            if waited + delay > self.policy.max_total_wait:
                break
            log.debug("%s: %s; retry %d in %.2f s", self.where, last, attempt, delay)
            self._wait(delay)
            waited += delay
        raise _GaveUp(self.redact(f"no answer after {attempt} attempt(s) and {waited:.1f} s of waiting; "
                                  f"last error: {last}"), attempt)

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


def _reply_text(completion) -> tuple[Optional[str], str]:
    """(reply text, or None with the reason there is none). The openai client builds its objects
    without validation, so any field may hold any JSON value."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        return None, "the reply has no choices"
    message = getattr(choices[0], "message", None)
    text = getattr(message, "content", None)
    if isinstance(text, str) and text.strip():
        return text, ""
    refusal = getattr(message, "refusal", None)
    finish = getattr(choices[0], "finish_reason", None)
    return None, f"empty reply (finish_reason {finish!r}{', refusal: ' + refusal if isinstance(refusal, str) else ''})"


def _kept(text: str) -> str:
    """A reply text as kept in records: whole, unless it is far longer than any answer."""
    if len(text) <= _KEPT_CHARS:
        return text
    return text[:_KEPT_CHARS] + f"... [{len(text) - _KEPT_CHARS:,} more characters]"


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


def run_concurrently(fn: Callable[[T], Any], items: Iterable[T],
                     concurrency: int) -> Iterator[tuple[T, concurrent.futures.Future]]:
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
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    yield running.pop(future), future
        finally:
            for future in running:
                future.cancel()


_END = object()
