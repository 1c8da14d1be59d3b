"""The judge client's errors that stop a whole run (one item's problems come back in its Reply)."""

from __future__ import annotations


class JudgeError(Exception):
  """A problem that stops a whole run, not one item."""


class JudgeUnavailable(JudgeError):
  """The endpoint looks down: requests in a row gave up with no answer in between."""


class JudgeConfigError(JudgeError):
  """The endpoint, key, deployment or account is wrong: no retry can help."""


class JudgeStopped(JudgeError):
  """`JudgeClient.stop()` was called while a request waited."""
