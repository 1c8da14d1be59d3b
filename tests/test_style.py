"""One code style (JAX/Flax's): pyink, 2-space indentation, 100 columns, as pyproject.toml says.

`pyink .` formats the repository; this test is the CI check (CI runs the test suite only).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_code_is_formatted_with_pyink():
  result = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--quiet", "."],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert (
      result.returncode == 0
  ), f"files not formatted (run `pyink .` in the repository root):\n{result.stderr[-3000:]}"
