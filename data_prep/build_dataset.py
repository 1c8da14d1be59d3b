"""Builds one of the manual-dir TFDS datasets (array_record) and prints its build report.

    python -m data_prep.build_dataset --dataset=reward_edit --manual_dir=/data/ip2p --data_dir=/data/tfds
    python -m data_prep.build_dataset --dataset=instruct_pix2pix --config=one_seed --manual_dir=... --data_dir=...
    python -m data_prep.build_dataset --dataset=real_edit --manual_dir=/data/real-edit --data_dir=/data/tfds

The same as `builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))`.
The `tfds build` command line needs TensorFlow installed (its CLI imports it); this one does not.
"""

from __future__ import annotations

import json

from absl import app, flags

from data_prep import instruct_pix2pix, manual_dir, real_edit, reward_edit

DATASETS = {
    "reward_edit": reward_edit.Builder,
    "instruct_pix2pix": instruct_pix2pix.Builder,
    "real_edit": real_edit.Builder,
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, list(DATASETS), "which dataset")
flags.DEFINE_string("config", None, "builder config (instruct_pix2pix: all_seeds or one_seed)")
flags.DEFINE_string("manual_dir", None, "folder with the source files (layouts: see each builder)")
flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to")
flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])


def main(argv):
  del argv
  builder = manual_dir.build(
      DATASETS[FLAGS.dataset], FLAGS.manual_dir, FLAGS.data_dir, FLAGS.config
  )
  report = manual_dir.read_report(builder)
  print(f"{builder.info.full_name} in {builder.data_dir}")
  print(json.dumps({k: report[k] for k in ("kept", "skipped", "notes")}, indent=1))


if __name__ == "__main__":
  app.run(main)
