"""The judge prompts: annotation (score + failure text) and evaluation (yes/no + score), one request
per perspective, in the fixed order instruction following, detail preserving, generation quality.

This module is the contract between the clients (annotator, evaluator) and any judge behind an
OpenAI-compatible chat API, GPT-4o or the toy judge server: it builds the messages, and it formats
and parses the replies. Each prompt starts with a marker line,

    Judge prompt v1: evaluation / detail preserving

from which the toy server reads the form and the perspective, and carries the instruction on its
own line (`Editing instruction: ...`). Following and preserving show (original, edited) images in
that order; quality shows the edited image alone. Bump PROMPT_VERSION whenever a text changes:
scores from different prompt versions are not comparable.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import io
import json
import re
from typing import Optional

import numpy as np
from PIL import Image

from mre.models.reward_config import PAPER_PERFECT_TEXTS

PROMPT_VERSION = "v1"
# Longer replies are rejected before parsing: an answer is one short dict, and parsing megabytes of
# text (literal_eval above all) costs time and memory for nothing.
MAX_REPLY_CHARS = 20_000
PERSPECTIVES = ("following", "preserving", "quality")
FORMS = ("annotation", "evaluation")
PERSPECTIVE_NAMES = {
    "following": "instruction following",
    "preserving": "detail preserving",
    "quality": "generation quality",
}
# The yes/no key of each perspective's evaluation reply.
EVALUATION_KEYS = {"following": "following", "preserving": "consistent", "quality": "clear"}
# What an annotation says when nothing is wrong: the paper's perfect texts (the paper form's
# inference condition, mre/models/reward_config.py), lower-cased as a judge writes them in a reply.
NOTHING_WRONG = {p: text.lower() for p, text in zip(PERSPECTIVES, PAPER_PERFECT_TEXTS)}

SYSTEM_PROMPT = "You are a careful, strict judge of instruction-based image editing."

_IMAGES = {
    "two": "You are shown two images: first the original image, then the same image edited with "
    "the instruction below.",
    "one": "You are shown one image: the result of an image edit.",
}

_QUESTIONS = {
    "following": (
        "Judge only instruction following: does the edited image carry out the instruction, "
        "completely and in the right place? Ignore changes elsewhere and image quality."
    ),
    "preserving": (
        "Judge only detail preserving: did everything the instruction does not ask to change stay "
        "as it was (other objects, their places and colours, the background)? Ignore the edited "
        "part itself and image quality."
    ),
    "quality": (
        "Judge only generation quality: is the image clear and natural, free of noise, blur, "
        "blockiness, colour banding and other artifacts? Ignore what it shows."
    ),
}

_ANNOTATION_REPLY = (
    "Give a score from 0 (worst) to 5 (perfect) and name what is wrong in one short phrase; when "
    'nothing is wrong, write "{nothing_wrong}".\n'
    'Reply with JSON only: {{"score": <number from 0 to 5>, "failure": "<short phrase>"}}'
)

_EVALUATION_REPLY = (
    "Answer yes or no, and give a score from 0 (worst) to 5 (perfect).\n"
    "Reply with a Python dict only: {{'{key}': 'yes' or 'no', 'score': <number from 0 to 5>}}"
)

_MARKER = re.compile(
    r"^Judge prompt (?P<version>\S+): (?P<form>annotation|evaluation) / "
    r"(?P<perspective>instruction following|detail preserving|generation quality)\s*$",
    re.M,
)
_INSTRUCTION = re.compile(r"^Editing instruction: (?P<instruction>.*?)\s*$", re.M)


def prompt_text(form: str, perspective: str, instruction: Optional[str] = None) -> str:
  """The user-message text of one judge request (quality needs no instruction)."""
  _check(form, perspective)
  lines = [
      f"Judge prompt {PROMPT_VERSION}: {form} / {PERSPECTIVE_NAMES[perspective]}",
      _IMAGES["one" if perspective == "quality" else "two"],
  ]
  if perspective != "quality":
    if not instruction or not instruction.strip():
      raise ValueError(f"a {perspective} prompt needs the editing instruction")
    lines.append("Editing instruction: " + " ".join(instruction.split()))
  lines.append(_QUESTIONS[perspective])
  if form == "annotation":
    lines.append(_ANNOTATION_REPLY.format(nothing_wrong=NOTHING_WRONG[perspective]))
  else:
    lines.append(_EVALUATION_REPLY.format(key=EVALUATION_KEYS[perspective]))
  return "\n".join(lines)


def build_messages(
    form: str, perspective: str, instruction: Optional[str], original, edited
) -> list[dict]:
  """Chat messages for one judge request. Images: uint8 arrays, PIL images or PNG bytes."""
  images = [edited] if perspective == "quality" else [original, edited]
  content = [{"type": "text", "text": prompt_text(form, perspective, instruction)}]
  content += [
      {"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images
  ]
  return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def chat_request(
    model: str, form: str, perspective: str, instruction: Optional[str], original, edited, **options
) -> dict:
  """A /v1/chat/completions request body (for a direct call or a Batch API line)."""
  return {
      "model": model,
      "messages": build_messages(form, perspective, instruction, original, edited),
      "temperature": 0,
      **options,
  }


def identify(text: str) -> tuple[str, str, Optional[str]]:
  """(form, perspective, instruction or None) from a prompt built here; ValueError otherwise."""
  marker = _MARKER.search(text)
  if marker is None:
    raise ValueError(
        "the prompt has no 'Judge prompt <version>: <form> / <perspective>' marker line "
        "(build it with mre.judging.prompts)"
    )
  perspective = {v: k for k, v in PERSPECTIVE_NAMES.items()}[marker["perspective"]]
  instruction = _INSTRUCTION.search(text)
  return marker["form"], perspective, instruction["instruction"] if instruction else None


# ---------------------------------------------------------------------------------------------
# Replies.


@dataclasses.dataclass(frozen=True)
class Annotation:
  score: float
  failure: str


@dataclasses.dataclass(frozen=True)
class Evaluation:
  yes: bool
  score: float


def format_annotation_reply(score: float, failure: str) -> str:
  return json.dumps({"score": round(float(score), 1), "failure": failure})


def format_evaluation_reply(perspective: str, yes: bool, score: float) -> str:
  return repr(
      {EVALUATION_KEYS[perspective]: "yes" if yes else "no", "score": round(float(score), 1)}
  )


def parse_annotation_reply(text: str) -> Annotation:
  """Reads `{"score": ..., "failure": ...}` (code fences and surrounding words tolerated)."""
  reply = _dict_in(text)
  score = _score(reply, text)
  failure = reply.get("failure")
  if not isinstance(failure, str) or not failure.strip():
    raise ValueError(f"the judge reply has no failure text: {_shown(text)}")
  try:
    failure.encode(
        "utf-8"
    )  # JSON may carry a lone surrogate ("\\ud800"), which no file or tokenizer takes
  except UnicodeEncodeError:
    raise ValueError(
        f"the judge reply's failure text is not valid Unicode: {_shown(text)}"
    ) from None
  return Annotation(score, failure.strip())


def parse_evaluation_reply(perspective: str, text: str) -> Evaluation:
  """Reads `{'<key>': 'yes'|'no', 'score': ...}` for the perspective's key."""
  reply = _dict_in(text)
  key = EVALUATION_KEYS[perspective]
  answer = reply.get(key)
  answer = answer.strip().lower() if isinstance(answer, str) else None
  if answer not in ("yes", "no"):
    raise ValueError(f"the judge reply has no '{key}': 'yes'|'no' entry: {_shown(text)}")
  return Evaluation(answer == "yes", _score(reply, text))


def _dict_in(text: str) -> dict:
  if not isinstance(text, str):
    raise ValueError(f"a judge reply is a string, got {type(text).__name__}")
  if len(text) > MAX_REPLY_CHARS:
    raise ValueError(
        f"the judge reply is {len(text):,} characters long; an answer is a short dict "
        f"(at most {MAX_REPLY_CHARS:,}): {text[:80]!r}..."
    )
  match = re.search(r"\{.*\}", text, re.S)
  if match is None:
    raise ValueError(f"the judge reply holds no {{...}} dict: {_shown(text)}")
  for load in (json.loads, ast.literal_eval):
    try:
      reply = load(match.group(0))
    # A strange reply must come back as a malformed answer, never crash the run: deep nesting
    # overflows the decoders' recursion (RecursionError, MemoryError), and literal_eval raises
    # TypeError for unhashable keys such as {[1]: 2}.
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
      continue
    if isinstance(reply, dict):
      return reply
  raise ValueError(
      f"the judge reply's {{...}} is neither a JSON object nor a Python dict: {_shown(text)}"
  )


def _score(reply: dict, text: str) -> float:
  """A JSON number in 0..5. True/false (a bool is an int in Python) and quoted numbers ("3") are
  not scores: a judge that answers them has not followed the format, so the reply is re-asked."""
  score = reply.get("score")
  if score is None:
    raise ValueError(f"the judge reply has no score: {_shown(text)}")
  if isinstance(score, bool) or not isinstance(score, (int, float)):
    # Named by its type only: the repr of a deeply nested value could itself overflow.
    raise ValueError(
        f"the judge reply's score is a {type(score).__name__}, not a number: {_shown(text)}"
    )
  # Compared before float(): an int too large for a float would raise OverflowError.
  if not 0 <= score <= 5:  # also false for NaN
    raise ValueError(f"the judge reply's score {score!r} is outside 0..5")
  return float(score)


def _shown(text: str) -> str:
  """The reply as quoted in an error message, cut to a readable length."""
  return repr(text) if len(text) <= 120 else repr(text[:120]) + f"... ({len(text):,} characters)"


# ---------------------------------------------------------------------------------------------
# Images as data URLs.


def image_data_url(image) -> str:
  """`data:image/png;base64,...` for a uint8 [H, W, 3] array, a PIL image or PNG bytes."""
  if isinstance(image, (bytes, bytearray)):
    png = bytes(image)
  else:
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ValueError(f"images are sent as uint8 arrays, got {image.dtype}")
      image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
      raise ValueError(f"cannot send a {type(image).__name__} as an image")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    png = buffer.getvalue()
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def data_url_bytes(url: str) -> bytes:
  """The image bytes of a base64 data URL; ValueError for anything else (e.g. an http URL)."""
  match = re.fullmatch(
      r"data:image/[a-z0-9.+-]+;base64,(?P<data>[A-Za-z0-9+/=\s]+)", url or "", re.S
  )
  if match is None:
    raise ValueError(
        "image_url must be a base64 data URL (data:image/png;base64,...); got "
        f"{(url or '')[:40]!r}"
    )
  try:
    return base64.b64decode(match["data"], validate=False)
  except ValueError as error:
    raise ValueError(f"the image data URL is not valid base64 ({error})") from None


def _check(form: str, perspective: str) -> None:
  if form not in FORMS:
    raise ValueError(f"unknown prompt form {form!r}; expected one of {FORMS}")
  if perspective not in PERSPECTIVES:
    raise ValueError(f"unknown perspective {perspective!r}; expected one of {PERSPECTIVES}")
