"""The trainer's view of a dataset: the TFDS source, batches shaped for accumulation, validation items.

Any dataset of the project with the toy_edit feature names works (`config.data.name`, `.config`);
one whose module registers a builder (the toy world) is built on first use when
`config.data.build_if_missing` is set (`mre.data.registry`).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from mre.data import latent_cache, registry
from mre.data.pipeline import EditPipeline, FeatureKeys, PipelineConfig
from mre.models.reward_config import RewardConfig
from mre.pipeline import tokenize

# InstructPix2Pix's random crop: resize the short side to 256..288, crop 256.
RANDOM_CROP_UPSCALE = 288 / 256


def default_data_dir() -> str:
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


class Source:
  """A prepared TFDS dataset: its train split, its validation split, and (toy) its vocabulary."""

  def __init__(
      self,
      name: str,
      data_dir: str,
      split: str,
      val_split: str,
      vocabulary: Optional[list],
      judge=None,
  ):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    self.name, self.data_dir, self.vocabulary = name, data_dir, vocabulary
    self.judge = judge  # (instruction, original, edited) -> verdicts, for datasets that have one
    try:
      self.train = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise FileNotFoundError(
          f"dataset {name} (split {split}) is not prepared in {data_dir}: {e}. Build it first (see "
          "README, 'Datasets from manual dirs'), or use the toy world: --config=configs/reward.py:toy"
      ) from e
    self._val_split = val_split
    self._tfds = tfds

  def validation_items(self, n: int, resolution: int):
    """(originals [n, R, R, 3] in [-1, 1], instructions, references or None): the first n items."""
    source = self._tfds.data_source(
        self.name, split=self._val_split, data_dir=self.data_dir, download=False
    )
    n = min(n, len(source))
    records = [source[i] for i in range(n)]
    prep = lambda img: latent_cache.center_square(np.asarray(img), resolution)
    originals = np.stack([prep(r["original"]) for r in records])
    ref_key = "ideal" if "ideal" in records[0] else "edited"
    references = np.stack([prep(r[ref_key]) for r in records]) if ref_key in records[0] else None
    texts = [
        r["instruction"].decode() if isinstance(r["instruction"], bytes) else str(r["instruction"])
        for r in records
    ]
    return originals, texts, references


def open_dataset(config) -> Source:
  """The dataset `config.data` names, built first when it has a builder and `build_if_missing`
  is set; its vocabulary and judge come from its hooks (`mre.data.registry`), when it has them."""
  d = config.data
  data_dir = d.data_dir or default_data_dir()
  hooks = registry.hooks_for(d.name, data_dir, modules=tuple(d.get("modules", ())))
  if hooks is None:
    return Source(
        f"{d.name}/{d.config}" if d.config else d.name,
        data_dir,
        d.split,
        d.val_split,
        vocabulary=None,
        judge=None,
    )
  config_name = d.config or hooks.default_config
  if d.build_if_missing and hooks.build is not None:
    if jax.process_index() == 0:
      hooks.build(data_dir, config_name)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      multihost_utils.sync_global_devices(f"{d.name} built")
  vocabulary = hooks.vocabulary() if hooks.vocabulary is not None else None
  return Source(
      hooks.tfds_name(config_name), data_dir, d.split, d.val_split, vocabulary, hooks.judge
  )


class TokenizeFn:
  """Picklable tokenizer callable for grain worker processes.

  Ids are remembered per text: instructions and failure texts repeat across a dataset, and
  tokenising each example's four texts anew costs as much as decoding its images.
  """

  def __init__(self, tokenizer, cache_size: int = 200_000):
    self.tokenizer, self.cache_size = tokenizer, cache_size
    self._cache = {}

  def __call__(self, texts):
    texts = list(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
    if missing:
      if len(self._cache) + len(missing) > self.cache_size:
        self._cache.clear()
      self._cache.update(zip(missing, tokenize(self.tokenizer, missing)))
    return np.stack([self._cache[t] for t in texts])

  def __getstate__(self):  # worker processes start with an empty cache
    return {"tokenizer": self.tokenizer, "cache_size": self.cache_size, "_cache": {}}


class InMemorySource:
  """A random-access source read once into memory (records decoded), for small datasets.

  The toy world's 20,000 triplets take about 100 MB decoded; reading them once costs ~10 s,
  after which a batch no longer pays PNG decoding (~16 ms per 32 records on one CPU core, time
  the train step's threads would otherwise lose). Copies are shared by dataset and split within
  a process, so the runs of one replication read the data once.
  """

  _shared: dict = {}

  def __init__(self, source, key):
    if key not in InMemorySource._shared:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel

      InMemorySource._shared[key] = [
          source[i]
          for i in tqdm(
              range(len(source)), desc="reading into memory", mininterval=5, unit="rec", leave=False
          )
      ]
    self._records = InMemorySource._shared[key]

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]


class TrainIterator:
  """Per-host batches shaped [accum, batch_size, ...] for the train step, with a resumable state."""

  def __init__(
      self,
      source: Source,
      config,
      tokenizer,
      *,
      batch_size: int,
      accum: int,
      reward: Optional[RewardConfig],
      latents=None,
      tokenize_fn=None,
      reward_tokenize_fn=None,
  ):
    """`reward`: None for a model without reward (stage 1); `latents`: a
    `latent_cache.LatentSource` to read precomputed VAE latents from; `tokenize_fn`: texts ->
    int array [B, L] in place of `TokenizeFn(tokenizer)` (the SmartEdit trainer's prompts);
    `reward_tokenize_fn`: the same for the failure texts (default: the instructions' one)."""
    d = config.data
    target = d.get("target_key", "edited")
    if target != "edited" and latents is not None:
      raise ValueError(
          f"data.target_key={target!r} with data.precompute_latents: the latent cache holds "
          "the 'edited' field only; train on another target from images"
      )
    no_reward = {} if reward else {"reward_scores": None, "reward_texts": None}
    keys = FeatureKeys(edited=target, **no_reward)
    pc = PipelineConfig(
        batch_size=batch_size * accum,
        resolution=d.resolution,
        seed=config.seed,
        random_flip=d.random_flip,
        max_upscale=RANDOM_CROP_UPSCALE if d.random_crop else 1.0,
        reward=reward or RewardConfig(),
        keys=keys,
        precomputed=latent_cache.ARRAYS if latents is not None else (),
        worker_count=d.workers,
    )
    records = latents if latents is not None else source.train
    if d.in_memory and latents is None:
      records = InMemorySource(records, (source.name, source.data_dir, d.split))
    self.pipeline = EditPipeline(
        records,
        tokenize_fn or TokenizeFn(tokenizer),
        pc,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        reward_tokenizer=reward_tokenize_fn,
    )
    self.accum, self.batch_size = accum, batch_size
    self._it = iter(self.pipeline)

  def _shape(self, batch: dict) -> dict:
    out = {}
    for k, v in batch.items():
      if k == "record_key":
        continue
      if k == "reward_text_ids":
        k = "reward_ids"  # [B, slots, L]
      out[k] = np.asarray(v).reshape((self.accum, self.batch_size) + v.shape[1:])
    return out

  def next(self) -> dict:
    return self._shape(next(self._it))

  def peek(self) -> dict:
    """The next batch without consuming it (to compile the step ahead of time)."""
    state = self._it.get_state()
    batch = self.next()
    self._it.set_state(state)
    return batch

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict):
    self._it.set_state(state)

  def close(self):
    self._it.close()
