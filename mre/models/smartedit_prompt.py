"""SmartEdit's LLM prompt: the added tokens, the Vicuna v1 conversation, and its token ids.

The release grows LLaMA's 32000-word vocabulary by 35 tokens: `<img>` (32000, named in the system
message), `<im_start>` / `<im_end>` (32001, 32002, around the image) and `<img_0>..<img_31>`
(32003..32034). The user turn is `<im_start> <img_0> <im_end>{instruction}` inside a sentence of
the template; that first `<img_0>` is a placeholder which the model replaces by the projected CLIP
patch embeddings. The answer ends with ` <img_0> ... <img_31></s>`; the LLM's hidden states at
those 32 positions condition the U-Net.

Tokenisation: the text between added tokens, stripped of the spaces next to them, goes to `encode`
(any function text -> ids without BOS, e.g. a LLaMA tokenizer's); each added token becomes its id,
BOS starts the sequence. Stripping makes the generation prompt (ending `ASSISTANT:`) a prefix of the
training conversation (`ASSISTANT: <img_0> ...`), so teacher-forced and generated states agree; a
Hugging Face tokenizer with the 35 tokens added may keep a word-boundary mark there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

BASE_VOCAB = 32000
IMG, IM_START, IM_END = "<img>", "<im_start>", "<im_end>"
NUM_IMG_TOKENS = 32
IGNORE = -100  # label of a position without a language-model target

# The release's "vicuna_v1.3" conversation (USER/ASSISTANT, separators " " and "</s>").
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant can "
    "generate <img>. The assistant needs to conduct the image to image translation task based on "
    "given image and text information. The assistant gives helpful, detailed, and polite answers "
    "to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
# One of the release's editing templates; `[cap]` is the quoted user turn, `[img]` the 32 tokens.
TEMPLATE = (
    "Could you produce an image based on the previous image and text description [cap]?",
    "Certainly, I can create the image you requested [img].",
)


def img_token(k: int) -> str:
  return f"<img_{k}>"


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Ids of the added tokens (the release's order) and LLaMA's BOS/EOS."""

  img: int = BASE_VOCAB
  im_start: int = BASE_VOCAB + 1
  im_end: int = BASE_VOCAB + 2
  first_img: int = BASE_VOCAB + 3  # <img_0>; <img_k> is first_img + k
  num_img: int = NUM_IMG_TOKENS
  bos: int = 1
  eos: int = 2

  @property
  def num_added(self) -> int:
    return 3 + self.num_img

  @property
  def vocab_size(self) -> int:
    return self.first_img + self.num_img

  def added(self) -> dict[str, int]:
    out = {IMG: self.img, IM_START: self.im_start, IM_END: self.im_end}
    out.update({img_token(k): self.first_img + k for k in range(self.num_img)})
    return out


def user_turn(instruction: str, template=TEMPLATE) -> str:
  return template[0].replace("[cap]", f'"{IM_START} {img_token(0)} {IM_END}{instruction}"')


def answer_turn(num_img: int = NUM_IMG_TOKENS, template=TEMPLATE) -> str:
  tokens = "".join(f" {img_token(k)}" for k in range(num_img))
  return template[1].replace(" [img].", tokens).replace("[img]", tokens.strip())


def conversation(instruction: str, *, answer: bool, template=TEMPLATE, num_img=NUM_IMG_TOKENS):
  """The prompt text (newlines removed, as the release does); with `answer`, the assistant's turn
  and its `</s>` follow, else it ends at `ASSISTANT:` for generation."""
  text = f"{SYSTEM} {ROLES[0]}: {user_turn(instruction, template)} {ROLES[1]}:"
  if answer:
    text += " " + answer_turn(num_img, template) + "</s>"
  return text.replace("\n", "")


def tokenize(text: str, encode: Callable[[str], Sequence[int]], ids: TokenIds = TokenIds()):
  """Token ids of `text`: BOS, then `encode` between the added tokens (and `</s>`)."""
  special = {**ids.added(), "</s>": ids.eos}
  out, plain, i = [ids.bos], "", 0
  while i < len(text):
    hit = next((s for s in special if text.startswith(s, i)), None) if text[i] == "<" else None
    if hit is None:
      plain, i = plain + text[i], i + 1
      continue
    if plain.strip():
      out.extend(int(t) for t in encode(plain.strip()))
    out.append(special[hit])
    plain, i = "", i + len(hit)
  if plain.strip():
    out.extend(int(t) for t in encode(plain.strip()))
  return out


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Token ids [B, T] int32, attention mask [B, T] bool and LM labels [B, T] (IGNORE where no
  target; the answer's own ids elsewhere, unshifted)."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray


def prompt_batch(
    instructions: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    *,
    answer: bool,
    ids: TokenIds = TokenIds(),
    template=TEMPLATE,
    pad_id: int = 0,
    length: int | None = None,
) -> PromptBatch:
  """The batch of prompts: left-padded for generation (`answer=False`), right-padded with labels
  on the answer tokens for teacher forcing (`answer=True`)."""
  rows, labels = [], []
  for instruction in instructions:
    full = tokenize(
        conversation(instruction, answer=answer, template=template, num_img=ids.num_img),
        encode,
        ids,
    )
    prompt = tokenize(
        conversation(instruction, answer=False, template=template, num_img=ids.num_img), encode, ids
    )
    rows.append(full)
    labels.append([IGNORE] * len(prompt) + full[len(prompt) :] if answer else [IGNORE] * len(full))
    if full.count(ids.first_img) != (2 if answer else 1):
      raise ValueError(f"instruction {instruction!r} may not contain the added tokens")
  n = length or max(map(len, rows))
  if max(map(len, rows)) > n:
    raise ValueError(f"a prompt has {max(map(len, rows))} tokens, more than length={n}")
  out_ids = np.full((len(rows), n), pad_id, np.int32)
  out_mask = np.zeros((len(rows), n), bool)
  out_labels = np.full((len(rows), n), IGNORE, np.int32)
  for r, (row, lab) in enumerate(zip(rows, labels)):
    span = slice(0, len(row)) if answer else slice(n - len(row), n)
    out_ids[r, span], out_mask[r, span], out_labels[r, span] = row, True, lab
  return PromptBatch(out_ids, out_mask, out_labels)
