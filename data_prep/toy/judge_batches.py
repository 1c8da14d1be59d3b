"""The toy judge server's Files and Batches API: uploads kept in memory, and batches answered line by
line in a background thread, with OpenAI's validation rules and output/error files."""

from __future__ import annotations

import json
import threading
import time
import uuid

from data_prep.toy.judge_answers import RequestError, completion_body, error_body


class FilesAndBatches:
  """Mixed into `JudgeServer`, which provides `_lock`, the `files` and `batches` dicts,
  `model_name`, and `answer(body) -> (reply, usage)` (raising RequestError)."""

  def add_file(self, data: bytes, filename: str, purpose: str) -> dict:
    file = {
        "id": "file-" + uuid.uuid4().hex[:24],
        "object": "file",
        "bytes": len(data),
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }
    with self._lock:
      self.files[file["id"]] = {**file, "data": data}
    return file

  def file(self, file_id: str) -> dict:
    with self._lock:
      if file_id not in self.files:
        raise RequestError(404, f"no file with id {file_id!r}")
      return self.files[file_id]

  def create_batch(self, body) -> dict:
    if not isinstance(body, dict):
      raise RequestError(400, "the request body must be a JSON object")
    endpoint = body.get("endpoint")
    if endpoint != "/v1/chat/completions":
      raise RequestError(
          400, f"only the /v1/chat/completions endpoint is batched, got {endpoint!r}"
      )
    if body.get("completion_window") != "24h":
      raise RequestError(400, "completion_window must be '24h'")
    source = self.file(str(body.get("input_file_id")))
    now = int(time.time())
    batch = {
        "id": "batch_" + uuid.uuid4().hex[:24],
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": source["id"],
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + 24 * 3600,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.get("metadata"),
    }
    with self._lock:
      self.batches[batch["id"]] = batch
    threading.Thread(
        target=self._run_batch, args=(batch["id"], source["data"]), daemon=True
    ).start()
    return dict(batch)

  def batch(self, batch_id: str) -> dict:
    with self._lock:
      if batch_id not in self.batches:
        raise RequestError(404, f"no batch with id {batch_id!r}")
      return json.loads(json.dumps(self.batches[batch_id]))

  def _update_batch(self, batch_id: str, **fields):
    with self._lock:
      self.batches[batch_id].update(fields)

  def _run_batch(self, batch_id: str, data: bytes):
    """Validates every line first (a bad line fails the whole batch, as OpenAI does), then
    answers each request: 200 answers go to the output file, errors to the error file."""
    requests, problems = [], []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
      if not line.strip():
        continue
      try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
          raise ValueError("each line needs a string 'custom_id'")
        if request.get("method") != "POST" or request.get("url") != "/v1/chat/completions":
          raise ValueError("each line needs method 'POST' and url '/v1/chat/completions'")
        requests.append(request)
      except ValueError as error:
        problems.append(
            {"code": "invalid_request", "message": str(error), "param": None, "line": number}
        )
    if problems or not requests:
      problems = problems or [
          {
              "code": "empty_file",
              "message": "the input file has no requests",
              "param": None,
              "line": None,
          }
      ]
      self._update_batch(
          batch_id,
          status="failed",
          failed_at=int(time.time()),
          errors={"object": "list", "data": problems},
      )
      return
    self._update_batch(
        batch_id,
        status="in_progress",
        in_progress_at=int(time.time()),
        request_counts={"total": len(requests), "completed": 0, "failed": 0},
    )
    outputs, errors = [], []
    for request in requests:
      line = {
          "id": "batch_req_" + uuid.uuid4().hex[:24],
          "custom_id": request["custom_id"],
          "error": None,
      }
      body = request.get("body")
      try:
        reply, usage = self.answer(body)
        model = body.get("model", self.model_name)
        line["response"] = {
            "status_code": 200,
            "request_id": uuid.uuid4().hex,
            "body": completion_body(reply, usage, model),
        }
        outputs.append(line)
      except RequestError as error:
        line["response"] = {
            "status_code": error.status,
            "request_id": uuid.uuid4().hex,
            "body": error_body(error.message, error.kind),
        }
        errors.append(line)
      self._update_batch(
          batch_id,
          request_counts={"total": len(requests), "completed": len(outputs), "failed": len(errors)},
      )
    self._update_batch(batch_id, status="finalizing", finalizing_at=int(time.time()))
    files = {}
    for key, lines in (("output_file_id", outputs), ("error_file_id", errors)):
      if lines:
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        files[key] = self.add_file(data, f"{batch_id}_{key[:-8]}.jsonl", "batch_output")["id"]
    self._update_batch(batch_id, status="completed", completed_at=int(time.time()), **files)
