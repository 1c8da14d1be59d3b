"""What one judged question comes back as: the parsed value or the error, the raw reply texts and
the tokens they cost."""

from __future__ import annotations

import dataclasses
from typing import Generic, Optional, TypeVar

T = TypeVar("T")
# Reply texts are kept whole in records up to this length (answers are a few dozen characters).
_KEPT_CHARS = 20_000


@dataclasses.dataclass(frozen=True)
class Usage:
  prompt_tokens: int = 0
  completion_tokens: int = 0

  def __add__(self, other: "Usage") -> "Usage":
    return Usage(
        self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens
    )

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


def reply_text(completion) -> tuple[Optional[str], str]:
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
  return (
      None,
      f"empty reply (finish_reason {finish!r}{', refusal: ' + refusal if isinstance(refusal, str) else ''})",
  )


def kept_text(text: str) -> str:
  """A reply text as kept in records: whole, unless it is far longer than any answer."""
  if len(text) <= _KEPT_CHARS:
    return text
  return text[:_KEPT_CHARS] + f"... [{len(text) - _KEPT_CHARS:,} more characters]"
