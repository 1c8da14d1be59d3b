"""The trainer and `mre.eval` find a dataset's builder, vocabulary and judge through the registry."""

import subprocess
import sys

import ml_collections
import numpy as np

from data_prep import toy_edit
from data_prep.toy import judge
from data_prep.toy.vocabulary import vocabulary
from mre.data import registry, train_input

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_the_toy_module_registers_its_hooks_on_import():
  hooks = registry.hooks_for("toy_edit/tiny", modules=("data_prep.toy_edit",))
  assert hooks is toy_edit.HOOKS and hooks is registry.registered("toy_edit")
  assert hooks.tfds_name("tiny") == "toy_edit/tiny"
  assert hooks.tfds_name("") == toy_edit.dataset_name()  # the default config
  assert hooks.vocabulary() == vocabulary() and hooks.judge is judge.judge
  assert hooks.build is toy_edit.ensure_built and hooks.serve_judge is not None


def test_a_plain_tfds_dataset_has_no_hooks(tmp_path):
  assert registry.hooks_for("reward_edit", str(tmp_path)) is None
  assert registry.builder_module("reward_edit", str(tmp_path)) is None


def test_a_prepared_dataset_names_the_module_that_registers_it(toy_data):
  """`mre.eval --toy_judge` gets no config: the prepared benchmark says which module built it."""
  assert (
      registry.builder_module("toy_edit/tiny", toy_data)
      == "data_prep.toy_edit.toy_edit_dataset_builder"
  )
  code = (
      "import sys; from mre.data import registry; "
      "assert 'data_prep' not in sys.modules; "
      f"h = registry.hooks_for('toy_edit/tiny', {toy_data!r}); "
      "print(h.name, h.tfds_name('tiny'))"
  )
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout
  assert out.split() == ["toy_edit", "toy_edit/tiny"]


def test_open_dataset_takes_the_toy_hooks_from_the_config_modules(toy_data):
  data = ml_collections.ConfigDict(
      dict(
          name="toy_edit",
          config="tiny",
          data_dir=toy_data,
          split="train",
          val_split="test",
          build_if_missing=True,
          modules=("data_prep.toy_edit",),
      )
  )
  source = train_input.open_dataset(ml_collections.ConfigDict({"data": data}))
  assert source.name == "toy_edit/tiny" and len(source.train) == 48
  assert source.vocabulary == vocabulary() and source.judge is judge.judge
  originals, texts, references = source.validation_items(2, 16)
  assert originals.shape == (2, 16, 16, 3) and len(texts) == 2 and references.shape[0] == 2
  assert np.all(np.abs(originals) <= 1)
