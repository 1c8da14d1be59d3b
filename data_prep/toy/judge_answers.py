"""The toy judge's answers to chat-completion bodies, in the OpenAI wire format."""

from __future__ import annotations

import re
import time
import uuid
from typing import Optional

from data_prep.toy import judge
from mre.judging import prompts


class RequestError(Exception):
  """An error answered to the client as an OpenAI-style error body."""

  def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.kind = status, message, kind


def answer_chat(body) -> tuple[str, dict]:
  """The judge's reply text to a chat-completions request body, and its token usage."""
  if not isinstance(body, dict):
    raise RequestError(400, "the request body must be a JSON object")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError(400, "'messages' must be a non-empty list")
  texts, images = [], []
  for message in messages:
    if not isinstance(message, dict) or "content" not in message:
      raise RequestError(400, "each message must be an object with 'role' and 'content'")
    content = message["content"]
    if message.get("role") != "user":
      continue
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
      raise RequestError(400, "message 'content' must be a string or a list of content parts")
    for part in parts:
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        texts.append(part["text"])
      elif kind == "image_url" and isinstance(part.get("image_url"), dict):
        try:
          images.append(prompts.data_url_bytes(part["image_url"].get("url")))
        except ValueError as error:
          raise RequestError(400, str(error)) from None
      else:
        raise RequestError(
            400,
            f"unsupported content part {str(part)[:80]!r}; expected "
            "{'type': 'text', ...} or {'type': 'image_url', ...}",
        )
  text = "\n".join(texts)
  try:
    form, perspective, instruction = prompts.identify(text)
  except ValueError as error:
    raise RequestError(400, str(error)) from None
  needed = 1 if perspective == "quality" else 2
  if len(images) < needed:
    raise RequestError(
        400,
        f"a {perspective} request needs {needed} image(s) "
        f"({'edited' if needed == 1 else 'original, edited'}), got {len(images)}",
    )
  try:
    if perspective == "quality":
      verdict = judge.judge_quality(images[-1])
    else:
      if instruction is None:
        raise ValueError("the prompt has no 'Editing instruction: ...' line")
      verdict = judge.judge_perspective(perspective, instruction, images[0], images[-1])
  except ValueError as error:
    raise RequestError(400, f"cannot judge this request: {error}") from None
  if form == "annotation":
    reply = prompts.format_annotation_reply(verdict.score, verdict.failure)
  else:
    reply = prompts.format_evaluation_reply(perspective, verdict.yes, verdict.score)
  prompt_tokens = _count_tokens(text) + 85 * len(images)  # 85: GPT-4o's cost of a low-detail image
  completion_tokens = _count_tokens(reply)
  return reply, {
      "prompt_tokens": prompt_tokens,
      "completion_tokens": completion_tokens,
      "total_tokens": prompt_tokens + completion_tokens,
  }


def _count_tokens(text: str) -> int:
  return len(re.findall(r"\w+|[^\w\s]", text))


def completion_body(
    reply: str, usage: dict, model: str, completion_id: Optional[str] = None
) -> dict:
  return {
      "id": completion_id or "chatcmpl-" + uuid.uuid4().hex[:24],
      "object": "chat.completion",
      "created": int(time.time()),
      "model": model,
      "system_fingerprint": f"toy-judge-{prompts.PROMPT_VERSION}",
      "choices": [
          {
              "index": 0,
              "finish_reason": "stop",
              "logprobs": None,
              "message": {"role": "assistant", "content": reply, "refusal": None},
          }
      ],
      "usage": usage,
  }


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
  return {"error": {"message": message, "type": kind, "param": None, "code": None}}
