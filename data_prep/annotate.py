"""Reward annotation of editing triplets with GPT-4o or any OpenAI-compatible judge.

    # a TFDS split (features id / instruction / original / edited by default)
    OPENAI_API_KEY=... python -m data_prep.annotate --tfds_name=instruct_pix2pix/one_seed \\
        --data_dir=/data/tfds --output=rewards.jsonl --concurrency=16
    # or a JSONL of {"id", "instruction", "original", "edited"} (image paths relative to it)
    python -m data_prep.annotate --jsonl=triplets.jsonl --output=rewards.jsonl
    # Batch API (half price, within 24 h; rerun the same command to collect after an interruption)
    python -m data_prep.annotate ... --batch
    # Azure OpenAI (key in AZURE_OPENAI_API_KEY)
    python -m data_prep.annotate ... --provider=azure --azure_endpoint=https://NAME.openai.azure.com \\
        --azure_deployment=gpt-4o --api_version=2024-10-21
    # vLLM / Ollama serving an open VLM
    python -m data_prep.annotate ... --base_url=http://localhost:8000/v1 --model=Qwen/Qwen2-VL-7B-Instruct
    # the released RewardEdit20K layout, both ways
    python -m data_prep.annotate --output=rewards.jsonl --export_json=RewardEdit_20K.json
    python -m data_prep.annotate --output=released.jsonl --import_json=RewardEdit_20K.json

Reruns resume (finished ids are skipped). The API key is read from the environment only
(--api_key_env names the variable) and never printed or written. The final summary gives an
estimated cost from a built-in price table (data_prep.annotation_summary.PRICES_PER_MILLION), the failed
items and bad input lines, and ends with what to do next. Exit status: 0 when the run finished
(failed items included), 1 when it stopped early (the judge looks down, a wrong key) or could not
start.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from data_prep import annotation, annotation_batch, annotation_items, annotation_records
from mre import cli_flags
from mre.judging.client import JudgeClient, JudgeError, RetryPolicy

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "the annotation JSONL (appended to; resumes)")
flags.DEFINE_string("tfds_name", None, "TFDS dataset to annotate, e.g. toy_edit/32px")
flags.DEFINE_string("split", "train", "TFDS split")
flags.DEFINE_string("data_dir", None, "TFDS data_dir")
flags.DEFINE_string("id_key", "id", "TFDS feature with the item id ('' for the record index)")
flags.DEFINE_string("instruction_key", "instruction", "TFDS feature with the edit instruction")
flags.DEFINE_string("original_key", "original", "TFDS feature with the original image")
flags.DEFINE_string("edited_key", "edited", "TFDS feature with the edited image")
flags.DEFINE_string(
    "jsonl", None, "JSONL of {id, instruction, original, edited} to annotate instead of TFDS"
)
flags.DEFINE_integer("limit", None, "annotate only the first N items of the input")
flags.DEFINE_bool("retry_failed", False, "ask again the items recorded as failed")

flags.DEFINE_string(
    "model",
    annotation.DEFAULT_MODEL,
    "judge model (recorded in the output and used for the " "cost estimate)",
)
JUDGE = cli_flags.define_judge_flags()  # where the judge is: --provider, --base_url, --azure_*, ...
flags.adopt_module_key_flags(cli_flags)  # listed by --help with the command's own

flags.DEFINE_integer("concurrency", 8, "items annotated at once (each has one request in flight)")
flags.DEFINE_integer(
    "max_attempts", 8, "HTTP attempts per request on 429 / 5xx / timeouts / connection errors"
)
flags.DEFINE_float(
    "initial_delay", 1.0, "first backoff in seconds (doubles per retry, with jitter)"
)
flags.DEFINE_float("max_delay", 60.0, "longest single backoff in seconds")
flags.DEFINE_float("max_total_wait", 900.0, "most seconds one request may wait between attempts")
flags.DEFINE_integer(
    "reasks", 2, "new requests after a malformed reply before the item is recorded as failed"
)

flags.DEFINE_bool("batch", False, "use the Batch API")
flags.DEFINE_enum(
    "batch_fallback",
    "online",
    list(annotation_batch.FALLBACKS),
    "items with invalid batch replies: ask online, or record as failed",
)
flags.DEFINE_bool(
    "batch_wait", True, "wait for the batches (else submit and exit; rerun to collect)"
)
flags.DEFINE_float("poll_seconds", 30.0, "seconds between batch status checks")
flags.DEFINE_integer("batch_max_requests", annotation_batch.MAX_REQUESTS, "requests per batch file")
flags.DEFINE_integer("batch_max_bytes", annotation_batch.MAX_BYTES, "bytes per batch file")

flags.DEFINE_string(
    "export_json", None, "write the output's done records as a released-layout JSON and exit"
)
flags.DEFINE_string(
    "import_json", None, "append a released-layout JSON to the output (model 'released') and exit"
)
flags.DEFINE_bool("progress", True, "show progress bars")


def items_from_flags():
  if bool(FLAGS.tfds_name) == bool(FLAGS.jsonl):
    raise app.UsageError("give exactly one of --tfds_name and --jsonl")
  if FLAGS.jsonl:
    return annotation_items.JsonlItems(FLAGS.jsonl)
  features = annotation_items.FeatureNames(
      FLAGS.id_key or None, FLAGS.instruction_key, FLAGS.original_key, FLAGS.edited_key
  )
  return annotation_items.TfdsItems(FLAGS.tfds_name, FLAGS.split, FLAGS.data_dir, features)


def main(argv):
  del argv
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  if FLAGS.export_json:
    counts = annotation_records.export_released(FLAGS.output, FLAGS.export_json)
    print(
        f"wrote {counts['exported']} rewards to {FLAGS.export_json} "
        f"({counts['skipped']} failed records left out)"
    )
    return
  if FLAGS.import_json:
    counts = annotation_records.import_released(FLAGS.import_json, FLAGS.output)
    print(
        f"imported {counts['imported']} rewards into {FLAGS.output} ({counts['already_there']} already there, "
        f"{counts['bad']} bad entries skipped: see the log)"
    )
    return

  try:
    items = items_from_flags()
  except (
      ValueError,
      FileNotFoundError,
  ) as error:  # TFDS lists every dataset it knows: keep line one
    sys.exit(f"error: cannot read the input: {str(error).splitlines()[0]}")
  policy = RetryPolicy(
      FLAGS.max_attempts, FLAGS.initial_delay, FLAGS.max_delay, FLAGS.max_total_wait, FLAGS.reasks
  )
  try:
    endpoint = JUDGE.endpoint()
    judge = JudgeClient.from_endpoint(endpoint, policy)
  except (ValueError, JudgeError) as error:
    sys.exit(f"error: {error}")
  logging.info("annotating with %s via %s", FLAGS.model, endpoint.describe())
  common = dict(
      request_model=endpoint.request_model(FLAGS.model),
      concurrency=FLAGS.concurrency,
      retry_failed=FLAGS.retry_failed,
      limit=FLAGS.limit,
      progress=FLAGS.progress,
  )
  try:
    if FLAGS.batch:
      summary = annotation_batch.annotate_batch(
          items,
          FLAGS.output,
          judge,
          FLAGS.model,
          batch_url=endpoint.batch_url,
          fallback=FLAGS.batch_fallback,
          wait=FLAGS.batch_wait,
          poll_seconds=FLAGS.poll_seconds,
          max_requests=FLAGS.batch_max_requests,
          max_bytes=FLAGS.batch_max_bytes,
          **common,
      )
    else:
      summary = annotation.annotate(items, FLAGS.output, judge, FLAGS.model, **common)
  except annotation.AnnotationStopped as stopped:  # the judge looks down, or the key is wrong
    print(stopped.summary.format())
    sys.exit(f"error: {stopped.summary.stopped}")
  except (RuntimeError, ValueError) as error:  # output locked, or written by another model / prompt
    sys.exit(f"error: {judge.redact(str(error))}")
  print(summary.format())


if __name__ == "__main__":
  app.run(main)
