"""Telling a dead judge endpoint from requests that keep failing on their own."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from mre.judging.errors import JudgeStopped, JudgeUnavailable


class EndpointHealth:
  """Tells a dead endpoint from requests that keep failing on their own (thread-safe).

  A request that gave up waits for evidence. An answer from the endpoint to anything else means
  it works: the request was the problem, and its item fails. When no request is left trying
  (after `grace` seconds, in which the other workers would start their next request), one of the
  waiting requests probes: it sends again the last request the endpoint answered. Answered, the
  waiting requests fail alone; not answered (or nothing ever answered to probe with), the
  endpoint is down, and every waiting and new request raises JudgeUnavailable.
  """

  def __init__(self, where: str, grace: float):
    self.where, self.grace = where, grace
    self._condition = threading.Condition()
    self._answers = 0  # answers received: any response that is not a transient fault
    self._trying = 0  # requests (probes included) sending or waiting between their attempts
    self.down: Optional[str] = None

  def enter(self) -> None:
    with self._condition:
      self._raise_if_down()
      self._trying += 1

  def leave(self) -> None:
    with self._condition:
      self._trying -= 1
      self._condition.notify_all()

  def answered(self) -> None:
    with self._condition:
      self._answers += 1
      self._condition.notify_all()

  def gave_up(
      self, reason: str, stopped: threading.Event, probe: Optional[Callable[[], bool]]
  ) -> None:
    """After leave(): returns when this request is shown to be the problem, raises
    JudgeUnavailable when the endpoint looks down, JudgeStopped on stop(). probe(): sends the
    last answered request again, True when answered (None: nothing was ever answered)."""
    with self._condition:
      seen, idle_since = self._answers, None
      while self.down is None and self._answers == seen:
        if stopped.is_set():
          raise JudgeStopped("stopped")
        if self._trying:  # another request (or a probe) may still bring an answer
          idle_since = None
        else:
          idle_since = idle_since or time.monotonic()
          if time.monotonic() - idle_since >= self.grace:
            if probe is None:
              self._set_down("it has not answered any request yet")
            elif not self._probe(probe):
              self._set_down(
                  "requests gave up, and the last request it answered, sent again, "
                  "got no answer either"
              )
            continue
        self._condition.wait(0.05)
      self._raise_if_down(reason)

  def _probe(self, probe: Callable[[], bool]) -> bool:
    """probe() outside the lock (it counts as trying, so the other waiters keep waiting)."""
    self._trying += 1
    self._condition.release()
    try:
      return probe()
    finally:
      self._condition.acquire()
      self._trying -= 1
      self._condition.notify_all()

  def _set_down(self, why: str) -> None:
    self.down = f"{self.where} looks down: {why}"
    self._condition.notify_all()

  def _raise_if_down(self, reason: Optional[str] = None) -> None:
    if self.down is not None:
      raise JudgeUnavailable(self.down + (f" (last: {reason})" if reason else ""))
