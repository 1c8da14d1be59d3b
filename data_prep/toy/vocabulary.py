"""The closed word list of the toy world: every word an instruction or a judge text can contain.

A tiny text encoder trained from scratch gets a tokenizer built from this list (one token per word),
so nothing the dataset or the judge writes is ever out of vocabulary.
"""

from __future__ import annotations

import re

from data_prep.toy import instructions, judge, scenes

_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")


def words(text: str) -> list[str]:
  """How toy texts split into words: lower-case letter runs (punctuation and digits dropped)."""
  return re.findall(r"[a-z]+", text.lower())


def vocabulary() -> list[str]:
  """Sorted words of all instructions and all judge texts (failure and "nothing wrong" texts)."""
  templates = [t for ts in instructions.TEMPLATES.values() for t in ts]
  templates += [t for ts in instructions.GLOBAL_TEMPLATES.values() for t in ts]
  templates += list(judge.FAILURES.values()) + list(judge.NOTHING_WRONG.values())
  fillers = list(scenes.COLOURS) + list(scenes.SHAPES) + list(instructions.TONE_WORDS.values())
  found = {w for t in templates for w in words(_PLACEHOLDER.sub(" ", t))}
  found |= {w for f in fillers for w in words(f)}
  found.add("an")  # instructions.fix_articles writes "an orange"
  return sorted(found)
