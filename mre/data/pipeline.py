"""The training input pipeline: grain over any random-access source of editing triples.

    source = tfds.data_source("toy_edit/32px", split="train", data_dir=data_dir, download=False)
    pipeline = EditPipeline(source, tokenizer, PipelineConfig(batch_size=32, resolution=32),
                            process_index=jax.process_index(), process_count=jax.process_count())
    batches = iter(pipeline)
    batch = next(batches)            # dict of numpy arrays, see `EditPipeline`
    state = batches.get_state()      # JSON-serialisable; save it with the model checkpoint
    ...
    batches = iter(pipeline); batches.set_state(state)   # resumes on exactly the next batch

Order and augmentation are pure functions of (seed, epoch, record): each process reads a fixed
slice of the records (process_index::process_count), shuffled afresh every epoch by grain; each
example's crop and flip come from its own generator seeded with (seed, epoch, record key), and
are the same for both images of a pair. So a restored iterator, a different worker count or a
rerun all see the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image

from mre.models.reward_config import RewardConfig


class Tokenizer(Protocol):
  """Anything that turns texts into fixed-length token ids: int array [len(texts), max_length]."""

  def __call__(self, texts: list[str]) -> np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class FeatureKeys:
  """Which record fields hold what; reward keys may be None for datasets without rewards
  (stage-1 InstructPix2Pix data, or test splits)."""

  original: str = "original"
  edited: str = "edited"
  instruction: str = "instruction"
  reward_scores: Optional[str] = "reward_scores"
  reward_texts: Optional[str] = "reward_texts"


TOY_EDIT_KEYS = FeatureKeys()


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  batch_size: int  # per process
  resolution: int  # output images are resolution x resolution
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = None  # None: repeat forever
  drop_remainder: bool = True
  random_flip: bool = True  # horizontal, the same for both images
  # Images are resized so that their shorter side is uniform in [resolution, resolution *
  # max_upscale] (InstructPix2Pix trains with 256..288 for 256), then cropped at a random place
  # to resolution x resolution. 1.0: resize to the resolution exactly, crop only the long side.
  max_upscale: float = 1.0
  # How a record's three failure texts fill the model's text slots: three (paper form), or one
  # joined text (released form).
  reward: RewardConfig = RewardConfig()
  keys: FeatureKeys = TOY_EDIT_KEYS
  # Records carry precomputed arrays (e.g. VAE latents) under these keys instead of the two
  # images: they are passed through as float32, and the images are not read.
  precomputed: tuple = ()
  worker_count: int = 0  # grain worker processes; 0 reads in this process
  worker_buffer_size: int = 2  # batches each worker prepares ahead
  read_threads: int = 2  # threads per process reading and transforming records

  def __post_init__(self):
    if self.batch_size < 1 or self.resolution < 1:
      raise ValueError("batch_size and resolution must be positive")
    if self.max_upscale < 1.0:
      raise ValueError(f"max_upscale must be >= 1, got {self.max_upscale}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError("num_epochs must be None (forever) or >= 1")


class _PrepareExample:
  """Record key -> model inputs (picklable, so grain worker processes can run it)."""

  def __init__(
      self,
      source,
      tokenizer: Tokenizer,
      config: PipelineConfig,
      epoch_length: int,
      reward_tokenizer: Optional[Tokenizer] = None,
  ):
    self.source, self.tokenizer, self.config, self.epoch_length = (
        source,
        tokenizer,
        config,
        epoch_length,
    )
    self.reward_tokenizer = reward_tokenizer or tokenizer

  def __call__(self, index: int, key) -> dict:
    config, keys = self.config, self.config.keys
    key = int(key)
    record = self.source[key]
    if config.precomputed:
      example = {k: np.asarray(record[k], np.float32) for k in config.precomputed}
    else:
      rng = np.random.default_rng([config.seed, index // self.epoch_length, key])
      original, edited = _pair(record, keys)
      original, edited = _crop_and_flip(rng, original, edited, config)
      example = {"original": _to_unit_range(original), "edited": _to_unit_range(edited)}
    example["instruction_ids"] = self._tokens([_text(record[keys.instruction])])[0]
    example["record_key"] = np.int64(key)
    if keys.reward_scores is not None:
      scores = np.asarray(record[keys.reward_scores], np.float32)
      if scores.shape != (3,):
        raise ValueError(f"'{keys.reward_scores}' must hold 3 scores, got shape {scores.shape}")
      example["reward_scores"] = scores
    if keys.reward_texts is not None:
      texts = [_text(t) for t in record[keys.reward_texts]]
      if len(texts) != 3:
        raise ValueError(f"'{keys.reward_texts}' must hold 3 texts, got {len(texts)}")
      example["reward_text_ids"] = self._tokens(
          config.reward.slot_texts(texts), self.reward_tokenizer
      )
    return example

  def _tokens(self, texts: list[str], tokenizer=None) -> np.ndarray:
    ids = np.asarray((tokenizer or self.tokenizer)(texts))
    if ids.ndim != 2 or ids.shape[0] != len(texts) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
          f"the tokenizer must return an int array [{len(texts)}, max_length], "
          f"got {ids.dtype} {ids.shape}"
      )
    return ids.astype(np.int32)


class EditPipeline:
  """Batches of editing triples from a random-access source.

  Each batch is a dict of numpy arrays (B = config.batch_size, R = config.resolution):
    original, edited:  float32 [B, R, R, 3] in [-1, 1]
    instruction_ids:   int32 [B, L] (L: the tokenizer's length, 77 for CLIP)
    reward_scores:     float32 [B, 3]          (if keys.reward_scores)
    reward_text_ids:   int32 [B, S, L], S = config.reward.text_slots (if keys.reward_texts)
    record_key:        int64 [B], the records' indices in the source
  """

  def __init__(
      self,
      source: Sequence,
      tokenizer: Tokenizer,
      config: PipelineConfig,
      process_index: int = 0,
      process_count: int = 1,
      reward_tokenizer: Optional[Tokenizer] = None,
  ):
    """`reward_tokenizer` tokenises the failure texts (default: `tokenizer`, the instructions')."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    # Every process gets the same number of records, so all take the same number of steps.
    usable = len(source) - len(source) % process_count
    keys = grain.MapDataset.range(usable)[process_index::process_count]
    self.records_per_process = len(keys)
    if self.records_per_process < config.batch_size and config.drop_remainder:
      raise ValueError(
          f"{self.records_per_process} records per process cannot fill a batch of "
          f"{config.batch_size}"
      )
    if config.shuffle:
      keys = keys.shuffle(seed=config.seed)  # reshuffled every epoch by repeat()
    keys = keys.repeat(config.num_epochs)
    examples = keys.map_with_index(
        _PrepareExample(source, tokenizer, config, self.records_per_process, reward_tokenizer)
    )
    self._dataset = examples.batch(config.batch_size, drop_remainder=config.drop_remainder)

  @property
  def batches_per_epoch(self) -> int:
    full, rest = divmod(self.records_per_process, self.config.batch_size)
    return full + (1 if rest and not self.config.drop_remainder else 0)

  def __iter__(self) -> "EditIterator":
    config = self.config
    dataset = self._dataset.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.read_threads,
            prefetch_buffer_size=max(config.read_threads, 2 * config.batch_size),
        )
    )
    if config.worker_count > 0:
      # grain's worker processes read absl flags; outside an absl app nothing parsed them.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(
              num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
          )
      )
    return EditIterator(iter(dataset), self._fingerprint(), copy=config.worker_count > 0)

  def _fingerprint(self) -> dict:
    c = self.config
    return {
        "seed": c.seed,
        "batch_size": c.batch_size,
        "shuffle": c.shuffle,
        "num_epochs": c.num_epochs,
        "worker_count": c.worker_count,
        "process_index": self.process_index,
        "process_count": self.process_count,
        "records": self.records_per_process,
    }


class EditIterator:
  """A pipeline iterator whose position can be saved and restored (get_state / set_state)."""

  def __init__(self, iterator, fingerprint: dict, copy: bool = False):
    self._iterator, self._fingerprint, self._copy = iterator, fingerprint, copy

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._iterator is None:
      raise RuntimeError("this pipeline iterator is closed")
    batch = next(self._iterator)
    # Batches from worker processes live in shared memory: own copies free it right away.
    return {k: np.array(v) for k, v in batch.items()} if self._copy else batch

  def get_state(self) -> dict:
    """JSON-serialisable position: restoring it makes the next batch the one that follows."""
    return {"pipeline": dict(self._fingerprint), "grain": self._iterator.get_state()}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or "grain" not in state or "pipeline" not in state:
      raise ValueError("not a pipeline state: expected the dict EditIterator.get_state() returns")
    if state["pipeline"] != self._fingerprint:
      raise ValueError(
          f"this state belongs to another pipeline: saved {state['pipeline']}, "
          f"this one is {self._fingerprint}"
      )
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    """Stops grain's worker processes (when worker_count > 0); also on leaving a `with` block."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
    self._iterator = None  # let grain's iterator go now, not at interpreter exit

  def __enter__(self) -> "EditIterator":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _pair(record: dict, keys: FeatureKeys) -> tuple[np.ndarray, np.ndarray]:
  """The two images as uint8 [H, W, 3]; the edited one resized to the original's size."""
  images = []
  for name in (keys.original, keys.edited):
    if name not in record:
      raise KeyError(f"the record has no '{name}' field; it has {sorted(record)} (set FeatureKeys)")
    image = np.asarray(record[name])
    if image.ndim == 2:
      image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
      raise ValueError(f"'{name}' must be a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    images.append(image[:, :, :3])
  original, edited = images
  if edited.shape != original.shape:
    edited = _resize(edited, original.shape[0], original.shape[1])
  return original, edited


def _crop_and_flip(
    rng: np.random.Generator, original: np.ndarray, edited: np.ndarray, config: PipelineConfig
) -> tuple[np.ndarray, np.ndarray]:
  """Resize (short side uniform in [R, R * max_upscale]), random R x R crop, random flip; the
  same for both images. The random draws happen in a fixed order, whatever the image size."""
  resolution = config.resolution
  height, width = original.shape[:2]
  short = resolution * rng.uniform(1.0, config.max_upscale)
  scale = short / min(height, width)
  new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
  top_u, left_u, flip_u = rng.random(3)
  if (new_h, new_w) != (height, width):
    original, edited = _resize(original, new_h, new_w), _resize(edited, new_h, new_w)
  top, left = int(top_u * (new_h - resolution + 1)), int(left_u * (new_w - resolution + 1))
  crop = (slice(top, top + resolution), slice(left, left + resolution))
  original, edited = original[crop], edited[crop]
  if config.random_flip and flip_u < 0.5:
    original, edited = original[:, ::-1], edited[:, ::-1]
  return original, edited


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def _to_unit_range(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) / 127.5 - 1.0
