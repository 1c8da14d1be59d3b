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
