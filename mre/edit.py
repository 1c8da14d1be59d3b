"""Edit images with an instruction: `python -m mre.edit --model DIR --image IN --instruction TEXT`.

  python -m mre.edit --model=/models/instruct-pix2pix --image=cat.jpg \\
      --instruction="make it a watercolor" --output=cat_edited.png
  python -m mre.edit --model=ckpt/export --image=pairs.jsonl --output=edited/   # batch editing
  python -m mre.edit --model=reward_model --image=cat.jpg --instruction=... --reward=5,5,5
  python -m mre.edit --model=/models/SmartEdit-7B --image=cat.jpg --instruction=...   # SmartEdit

`--image` is one image, a folder of images (all edited with `--instruction`), or a JSONL file of
{"image": path, "instruction": text} lines (relative paths are taken from the JSONL's folder).
`--model` is an mre checkpoint, a diffusers folder or a SmartEdit editor folder
(`mre.model_io.smartedit_folder`; `--smartedit_*` flags name the folders it lacks).
`run(argv)` is the command in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

from absl import app, flags, logging
from tqdm import tqdm

from mre import cli_flags
from mre.editor import EditSettings, load_image
from mre.model_io.folders import load_for_editing
from mre.models.reward_config import parse_scores, parse_texts
from mre.smartedit_editor import editor_for

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class EditFlags:
  model: flags.FlagHolder
  image: flags.FlagHolder
  instruction: flags.FlagHolder
  output: flags.FlagHolder
  sampling: cli_flags.SamplingFlags
  smartedit: cli_flags.SmartEditFlags
  resolution: flags.FlagHolder
  reward: flags.FlagHolder
  reward_text: flags.FlagHolder
  reward_guidance: flags.FlagHolder
  reward_guidance_away: flags.FlagHolder
  reward_guidance_away_text: flags.FlagHolder
  dtype: flags.FlagHolder


def define_flags(flag_values=flags.FLAGS) -> EditFlags:
  """The command's flags, defined in `flag_values` (those of the process when run as a command;
  a fresh `FlagValues` in `run`, so that mre.edit and mre.eval can share one process)."""
  fv = flag_values
  sampling = cli_flags.define_sampling_flags(batch_size=4, flag_values=fv)
  smartedit = cli_flags.define_smartedit_flags(flag_values=fv)
  flags.adopt_module_key_flags(cli_flags, flag_values=fv)  # listed by --help with the command's own
  return EditFlags(
      model=flags.DEFINE_string(
          "model",
          None,
          "diffusers-format pipeline folder, mre checkpoint, or SmartEdit editor folder.",
          flag_values=fv,
      ),
      image=flags.DEFINE_string(
          "image", None, "An image, a folder of images, or a JSONL of pairs.", flag_values=fv
      ),
      instruction=flags.DEFINE_string("instruction", None, "The edit instruction.", flag_values=fv),
      output=flags.DEFINE_string(
          "output", "edited.png", "Output image path (or folder for batches).", flag_values=fv
      ),
      sampling=sampling,
      smartedit=smartedit,
      resolution=flags.DEFINE_integer(
          "resolution",
          512,
          "Long side in pixels (rounded to the model's size multiple, 64 for SD 1.5).",
          flag_values=fv,
      ),
      reward=flags.DEFINE_string(
          "reward", "5,5,5", "Reward scores: following,preserving,quality.", flag_values=fv
      ),
      reward_text=flags.DEFINE_multi_string(
          "reward-text",
          [],
          "Failure text(s): once for all three perspectives, or three times; default: "
          "the texts that say nothing is wrong.",
          flag_values=fv,
      ),
      reward_guidance=flags.DEFINE_float(
          "reward-guidance",
          None,
          "Reward guidance scale s_R: away from the null reward (only for models trained with "
          "reward dropout), or from --reward-guidance-away.",
          flag_values=fv,
      ),
      reward_guidance_away=flags.DEFINE_string(
          "reward-guidance-away",
          None,
          "Scores (e.g. 1,1,1) that reward guidance pushes away from instead of the null reward, "
          "like a negative prompt; any reward model (no reward dropout needed).",
          flag_values=fv,
      ),
      reward_guidance_away_text=flags.DEFINE_multi_string(
          "reward-guidance-away-text",
          [],
          "Failure texts of the reward --reward-guidance-away pushes from, three times (one per "
          "perspective; '*' keeps that perspective's --reward-text), e.g. '*' '*' 'the image is "
          "blurry'; default: the --reward-text ones.",
          flag_values=fv,
      ),
      dtype=flags.DEFINE_enum(
          "dtype", "float32", ["float32", "bfloat16"], "Computation dtype.", flag_values=fv
      ),
  )


def parse_reward(scores: str, texts):
  try:
    values = parse_scores(scores)
  except ValueError as e:
    raise app.UsageError(f"--reward: {e}") from e
  if len(texts) not in (0, 1, 3):
    raise app.UsageError("--reward-text is given once (all perspectives) or three times")
  return values, (tuple(texts) * 3 if len(texts) == 1 else tuple(texts) or None)


def parse_away_texts(texts, away):
  """--reward-guidance-away-text's three texts ('*' -> None: keep that perspective's), or None."""
  if texts and away is None:
    raise app.UsageError("--reward-guidance-away-text needs --reward-guidance-away (the scores)")
  try:
    return parse_texts(texts)
  except ValueError as e:
    raise app.UsageError(f"--reward-guidance-away-text: {e}") from e


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


def command(fl: EditFlags) -> list[str]:
  """The command with parsed flags; returns the paths written."""
  if not fl.model.value:
    raise app.UsageError(
        "--model is required (a diffusers pipeline folder, mre checkpoint or SmartEdit folder)"
    )
  scores, texts = parse_reward(fl.reward.value, fl.reward_text.value)
  away = None
  if fl.reward_guidance_away.value is not None:
    if fl.reward_guidance.value is None:
      raise app.UsageError("--reward-guidance-away needs --reward-guidance (the scale s_R)")
    away, _ = parse_reward(fl.reward_guidance_away.value, [])
  away_texts = parse_away_texts(fl.reward_guidance_away_text.value, away)
  jobs = collect_jobs(fl.image.value, fl.instruction.value, fl.output.value)
  if any(not (t and t.strip()) for _, t, _ in jobs):
    raise app.UsageError("an instruction is empty")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  pipe = load_for_editing(
      fl.model.value,
      smartedit=fl.smartedit.overrides(),
      dtype=jnp.bfloat16 if fl.dtype.value == "bfloat16" else jnp.float32,
  )
  settings = EditSettings(
      **fl.sampling.edit_settings(),
      resolution=fl.resolution.value,
      reward_scores=scores,
      reward_texts=texts,
      reward_scale=fl.reward_guidance.value,
      reward_negative_scores=away,
      reward_negative_texts=away_texts,
  )
  editor = editor_for(pipe, settings, **fl.smartedit.llm_settings())
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
        images, [t for _, t, _ in jobs], batch_size=fl.sampling.batch_size.value, progress=bar
    )
  elapsed = time.time() - start
  for (_, _, out), img in zip(jobs, edited):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out)
  print(
      f"edited {len(jobs)} image(s) in {elapsed:.1f} s ({elapsed / len(jobs):.2f} s/image, "
      f"compilation included); wrote {jobs[0][2] if len(jobs) == 1 else fl.output.value}"
  )
  return [out for _, _, out in jobs]


def run(argv: Sequence[str]) -> list[str]:
  """The command in this process: `argv` as on the command line, without the program name."""
  fv = flags.FlagValues()
  fl = define_flags(fv)
  fv(["mre.edit", *argv])
  return command(fl)


def main(argv):
  del argv
  command(_FLAGS)  # app.run exits with main's return value: None is success


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(main)
