"""A CLIP BPE tokenizer folder built from a closed word list (no hub needed).

The toy world and the tests need a real `CLIPTokenizer` but cannot download CLIP's 49k-token
vocabulary. We write `vocab.json` + `merges.txt` whose merges assemble each listed word from its
characters, so in-vocabulary words become one token and anything else falls back to characters.
"""

from __future__ import annotations

import json
import os
import string

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def write_word_tokenizer(folder: str, words, max_length: int = 77):
  """Writes a CLIPTokenizer folder whose vocabulary covers `words` (lower-cased) and characters."""
  os.makedirs(folder, exist_ok=True)
  chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
  vocab, merges = {}, []

  def add(tok):
    vocab.setdefault(tok, len(vocab))

  for c in chars:
    add(c)
    add(c + "</w>")
  for word in sorted({w.lower() for w in words if w}):
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    acc = pieces[0]
    for p in pieces[1:]:
      merges.append(f"{acc} {p}")
      acc += p
      add(acc)
  for s in SPECIALS:
    add(s)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(
        {
            "model_max_length": max_length,
            "bos_token": SPECIALS[0],
            "eos_token": SPECIALS[1],
            "unk_token": SPECIALS[1],
            "pad_token": SPECIALS[1],
            "tokenizer_class": "CLIPTokenizer",
        },
        f,
    )
  return folder


LLM_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: LLaMA's unk, BOS and EOS


def llm_words(texts) -> list[str]:
  """The words of `texts` as `write_llm_word_tokenizer`'s tokenizer splits them (runs of word
  characters, runs of other non-space characters), in first-seen order."""
  from tokenizers.pre_tokenizers import Whitespace  # pylint: disable=import-outside-toplevel

  split = Whitespace()
  return list(dict.fromkeys(w for t in texts for w, _ in split.pre_tokenize_str(t)))


def write_llm_word_tokenizer(folder: str, words) -> str:
  """A transformers tokenizer folder (`AutoTokenizer` opens it offline) standing in for LLaMA's in
  the toy world: one id per listed word (`llm_words`), after `<unk>`, `<s>`, `</s>` (0, 1, 2, as
  LLaMA numbers them); anything else is `<unk>`. A LLaMA tokenizer would split the closed toy
  vocabulary into sub-words for nothing: whole words keep the prompts short on the CPU."""
  from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel
  from tokenizers.pre_tokenizers import Whitespace  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

  vocab = {s: i for i, s in enumerate(LLM_SPECIALS)}
  for w in words:
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=LLM_SPECIALS[0]))
  tok.pre_tokenizer = Whitespace()
  unk, bos, eos = LLM_SPECIALS
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk)
  fast.save_pretrained(folder)
  return folder
