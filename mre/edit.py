"""Edit images with an instruction: `python -m mre.edit --model DIR --image IN --instruction TEXT`.

  python -m mre.edit --model=/models/instruct-pix2pix --image=cat.jpg \\
      --instruction="make it a watercolor" --output=cat_edited.png
  python -m mre.edit --model=ckpt/export --image=pairs.jsonl --output=edited/   # batch editing
  python -m mre.edit --model=reward_model --image=cat.jpg --instruction=... --reward=5,5,5

`--image` is one image, a folder of images (all edited with `--instruction`), or a JSONL file of
{"image": path, "instruction": text} lines (relative paths are taken from the JSONL's folder).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from tqdm import tqdm

from mre import cli_flags
from mre.editor import EditSettings, Editor, load_image
from mre.model_io.folders import load_any
from mre.models.reward_config import parse_scores

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_MODEL = flags.DEFINE_string("model", None, "diffusers-format pipeline folder or mre checkpoint.")
_IMAGE = flags.DEFINE_string("image", None, "An image, a folder of images, or a JSONL of pairs.")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "The edit instruction.")
_OUTPUT = flags.DEFINE_string("output", "edited.png", "Output image path (or folder for batches).")
_SAMPLING = cli_flags.define_sampling_flags(batch_size=4)
flags.adopt_module_key_flags(cli_flags)  # listed by --help with the command's own
_RESOLUTION = flags.DEFINE_integer(
    "resolution",
    512,
    "Long side in pixels (rounded to the " "model's size multiple, 64 for SD 1.5).",
)
_REWARD = flags.DEFINE_string("reward", "5,5,5", "Reward scores: following,preserving,quality.")
_REWARD_TEXT = flags.DEFINE_multi_string(
    "reward-text",
    [],
    "Failure text(s): once for all three perspectives, or three times; default: "
    "the texts that say nothing is wrong.",
)
_REWARD_GUIDANCE = flags.DEFINE_float(
    "reward-guidance",
    None,
    "Reward guidance scale s_R (only " "for models trained with reward dropout).",
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")


def parse_reward(scores: str, texts):
  try:
    values = parse_scores(scores)
  except ValueError as e:
    raise app.UsageError(f"--reward: {e}") from e
  if len(texts) not in (0, 1, 3):
    raise app.UsageError("--reward-text is given once (all perspectives) or three times")
  return values, (tuple(texts) * 3 if len(texts) == 1 else tuple(texts) or None)


def collect_jobs(image: str, instruction, output: str):
  """[(image path, instruction, output path)] for a file, a folder or a JSONL list."""
  if not image or not os.path.exists(image):
    raise app.UsageError(f"--image {image!r} does not exist")
  if image.endswith(".jsonl"):
    jobs, base = [], os.path.dirname(os.path.abspath(image))
    with open(image) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          item = json.loads(line)
          path, text = item["image"], item["instruction"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise app.UsageError(f"{image} line {n}: need {{'image': ..., 'instruction': ...}}: {e}")
        path = path if os.path.isabs(path) else os.path.join(base, path)
        name = item.get("output") or f"{n:05d}_{os.path.splitext(os.path.basename(path))[0]}.png"
        jobs.append((path, text, os.path.join(output, name)))
    return jobs
  if not (instruction and instruction.strip()):
    raise app.UsageError("--instruction is empty; give the edit to make")
  if os.path.isdir(image):
    files = sorted(f for f in os.listdir(image) if f.lower().endswith(IMAGE_EXTS))
    if not files:
      raise app.UsageError(f"no images ({', '.join(IMAGE_EXTS)}) in {image}")
    return [
        (os.path.join(image, f), instruction, os.path.join(output, os.path.splitext(f)[0] + ".png"))
        for f in files
    ]
  return [(image, instruction, output)]


def main(argv):
  del argv
  if not _MODEL.value:
    raise app.UsageError("--model is required (a diffusers pipeline folder or mre checkpoint)")
  scores, texts = parse_reward(_REWARD.value, _REWARD_TEXT.value)
  jobs = collect_jobs(_IMAGE.value, _INSTRUCTION.value, _OUTPUT.value)
  if any(not (t and t.strip()) for _, t, _ in jobs):
    raise app.UsageError("an instruction is empty")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  pipe = load_any(_MODEL.value, dtype=jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32)
  settings = EditSettings(
      **_SAMPLING.edit_settings(),
      resolution=_RESOLUTION.value,
      reward_scores=scores,
      reward_texts=texts,
      reward_scale=_REWARD_GUIDANCE.value,
  )
  editor = Editor(pipe, settings)
  if editor.is_reward:
    logging.info(
        "reward condition: scores %s, texts %s",
        scores,
        texts or pipe.unet.reward_config.perfect_texts,
    )
  images = [load_image(p) for p, _, _ in jobs]
  start = time.time()
  with tqdm(total=len(jobs), desc="editing", unit="img") as bar:
    edited = editor.edit(
        images, [t for _, t, _ in jobs], batch_size=_SAMPLING.batch_size.value, progress=bar
    )
  elapsed = time.time() - start
  for (_, _, out), img in zip(jobs, edited):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out)
  print(
      f"edited {len(jobs)} image(s) in {elapsed:.1f} s ({elapsed / len(jobs):.2f} s/image, "
      f"compilation included); wrote {jobs[0][2] if len(jobs) == 1 else _OUTPUT.value}"
  )


if __name__ == "__main__":
  app.run(main)
