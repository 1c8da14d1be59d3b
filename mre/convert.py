"""Convert between diffusers-format pipeline folders and mre checkpoints, either direction.

  python -m mre.convert --from=/models/instruct-pix2pix --to=/ckpt/ip2p_mre
  python -m mre.convert --from=/ckpt/ip2p_mre --to=/models/ip2p_diffusers

The output format defaults to the other one; `--to_format` forces it (e.g. diffusers -> diffusers
re-export with `*.safetensors` from `.bin` files).
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

from mre.model_io import diffusers_folder, folders, native_format

_FROM = flags.DEFINE_string("from", None, "Source folder (diffusers pipeline or mre checkpoint).")
_TO = flags.DEFINE_string("to", None, "Destination folder (created; must not hold a model).")
_TO_FORMAT = flags.DEFINE_enum(
    "to_format", None, ["diffusers", "mre"], "Output format; default: the other one."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty folder.")


def convert(src: str, dst: str, to_format: str | None = None, overwrite: bool = False) -> str:
  """Converts `src` into `dst`; returns the format written."""
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError("--from and --to are the same folder")
  if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
    raise FileExistsError(f"{dst} is not empty; pass --overwrite to write into it")
  pipe = folders.load_any(src)
  to_format = to_format or ("diffusers" if native_format.is_native(src) else "mre")
  if to_format == "mre":
    native_format.save_native(pipe, dst)
  else:
    diffusers_folder.save_pipeline(pipe, dst)
  return to_format


def main(argv):
  del argv
  if not _FROM.value or not _TO.value:
    raise app.UsageError("both --from and --to are required")
  start = time.time()
  fmt = convert(_FROM.value, _TO.value, _TO_FORMAT.value, _OVERWRITE.value)
  logging.info("wrote %s checkpoint to %s in %.1f s", fmt, _TO.value, time.time() - start)
  print(f"wrote {fmt} checkpoint to {_TO.value} in {time.time() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
