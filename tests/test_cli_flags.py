"""The flags mre.edit and mre.eval share (sampling) and mre.eval and data_prep.annotate share (the
judge endpoint): defined once, the same names and help in every command."""

import subprocess
import sys

import pytest
from absl import flags

from mre import cli_flags
from mre.diffusion.samplers import SAMPLERS


def test_sampling_flags_define_once_and_refuse_other_defaults():
  fv = flags.FlagValues()
  sampling = cli_flags.define_sampling_flags(batch_size=4, flag_values=fv)
  assert cli_flags.define_sampling_flags(batch_size=4, flag_values=fv) is sampling
  with pytest.raises(ValueError, match="batch_size=4, not batch_size=16"):
    cli_flags.define_sampling_flags(batch_size=16, flag_values=fv)
  fv(["cmd", "--sampler=ddim", "--steps=3", "--image-guidance=2"])
  assert sampling.edit_settings() == {
      "steps": 3,
      "sampler": "ddim",
      "text_scale": 7.5,
      "image_scale": 2.0,
      "seed": 42,
  }
  assert fv["sampler"].parser.enum_values == list(SAMPLERS)
  with pytest.raises(flags.IllegalFlagValueError):
    fv(["cmd", "--sampler=heun"])


def test_judge_flags_name_the_endpoint():
  fv = flags.FlagValues()
  judge = cli_flags.define_judge_flags(flag_values=fv)
  fv(["cmd", "--base_url=http://127.0.0.1:9/v1", "--timeout=5"])
  endpoint = judge.endpoint()
  assert (endpoint.provider, endpoint.base_url, endpoint.timeout) == (
      "compatible",
      "http://127.0.0.1:9/v1",
      5.0,
  )
  fv.unparse_flags()
  fv(["cmd", "--azure_endpoint=https://x.openai.azure.com", "--api_version=2024-10-21"])
  assert judge.endpoint().provider == "azure"


@pytest.mark.parametrize(
    "command,shared",
    [
        (
            "mre.edit",
            ["--sampler", "--steps", "--guidance", "--image-guidance", "--seed", "--batch-size"],
        ),
        (
            "mre.eval",
            [
                "--sampler",
                "--steps",
                "--guidance",
                "--image-guidance",
                "--seed",
                "--batch-size",
                "--provider",
                "--base_url",
                "--api_key_env",
                "--timeout",
            ],
        ),
        (
            "data_prep.annotate",
            ["--provider", "--base_url", "--azure_endpoint", "--api_key_env", "--timeout"],
        ),
    ],
)
def test_commands_list_the_shared_flags_in_their_help(command, shared):
  out = subprocess.run(
      [sys.executable, "-m", command, "--help"], capture_output=True, text=True, check=False
  ).stdout
  for name in shared:
    assert f"  {name}:" in out, (command, name)
  if "--sampler" in shared:
    assert "<euler_ancestral|euler|ddim|dpmpp_2m>" in out
