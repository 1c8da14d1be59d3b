"""Command-line flags that several commands share, defined in one place.

  define_sampling_flags()  how an editor samples: mre.edit and mre.eval
  define_smartedit_flags() a SmartEdit editor's LLM sampling and folders: mre.edit and mre.eval
  define_judge_flags()     which judge endpoint to call: mre.eval and data_prep.annotate

Each command calls the functions it needs when it defines its flags, with its own defaults where
they differ (the batch size), and reads the returned holders. A function defines its flags once per
FlagValues: a second call returns the same holders when it asks for the same defaults, and refuses
different ones by name. mre.edit and mre.eval define theirs in the process's FlagValues only when
run as commands; their `run(argv)` uses a fresh one, so both run in one process.
"""

from __future__ import annotations

import dataclasses
from absl import flags

from mre.judging.endpoint import PROVIDERS, Endpoint


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
  steps: flags.FlagHolder
  sampler: flags.FlagHolder
  guidance: flags.FlagHolder
  image_guidance: flags.FlagHolder
  seed: flags.FlagHolder
  batch_size: flags.FlagHolder

  def edit_settings(self) -> dict:
    """The `mre.editor.EditSettings` fields these flags set."""
    return dict(
        steps=self.steps.value,
        sampler=self.sampler.value,
        text_scale=self.guidance.value,
        image_scale=self.image_guidance.value,
        seed=self.seed.value,
    )


@dataclasses.dataclass(frozen=True)
class SmartEditFlags:
  temperature: flags.FlagHolder
  max_new_tokens: flags.FlagHolder
  folders: dict  # smartedit.json key -> holder: clip, ip2p, llm_tokenizer, base_llm, step

  def llm_settings(self) -> dict:
    """The LLM fields of `mre.smartedit_editor.SmartEditSettings`."""
    return dict(temperature=self.temperature.value, max_new_tokens=self.max_new_tokens.value)

  def overrides(self) -> dict:
    """The `smartedit.json` entries the flags give (`mre.model_io.folders.load_for_editing`)."""
    return {k: h.value for k, h in self.folders.items() if h.value is not None}


@dataclasses.dataclass(frozen=True)
class JudgeFlags:
  provider: flags.FlagHolder
  base_url: flags.FlagHolder
  azure_endpoint: flags.FlagHolder
  azure_deployment: flags.FlagHolder
  api_version: flags.FlagHolder
  api_key_env: flags.FlagHolder
  timeout: flags.FlagHolder

  def endpoint(self) -> Endpoint:
    """The `Endpoint` the flags name (provider: azure with --azure_endpoint, compatible with
    --base_url, else openai)."""
    provider = self.provider.value or (
        "azure" if self.azure_endpoint.value else "compatible" if self.base_url.value else "openai"
    )
    return Endpoint(
        provider=provider,
        base_url=self.base_url.value,
        azure_endpoint=self.azure_endpoint.value,
        azure_deployment=self.azure_deployment.value,
        api_version=self.api_version.value,
        api_key_env=self.api_key_env.value,
        timeout=self.timeout.value,
    )


_DEFINED: dict = {}  # (group, id(flag_values)) -> (defaults, holders)


def _once(group: str, defaults: dict, flag_values, define):
  key = (group, id(flag_values))
  if key in _DEFINED:
    known, holders = _DEFINED[key]
    if known != defaults:
      was = ", ".join(f"{k}={known[k]!r}" for k in sorted(known))
      now = ", ".join(f"{k}={defaults[k]!r}" for k in sorted(defaults))
      raise ValueError(f"the {group} flags are defined already with defaults {was}, not {now}")
    return holders
  holders = define()
  _DEFINED[key] = (defaults, holders)
  return holders


def define_sampling_flags(*, batch_size: int, flag_values=flags.FLAGS) -> SamplingFlags:
  """--steps, --sampler, --guidance, --image-guidance, --seed and --batch-size."""
  # Imported here: the judge's commands (data_prep.annotate) need not load JAX.
  from mre.diffusion.samplers import SAMPLERS  # pylint: disable=import-outside-toplevel

  fv = flag_values

  def define():
    return SamplingFlags(
        steps=flags.DEFINE_integer("steps", 30, "Sampling steps.", flag_values=fv),
        sampler=flags.DEFINE_enum(
            "sampler", "euler_ancestral", list(SAMPLERS), "Sampler.", flag_values=fv
        ),
        guidance=flags.DEFINE_float("guidance", 7.5, "Text guidance scale s_T.", flag_values=fv),
        image_guidance=flags.DEFINE_float(
            "image-guidance", 1.5, "Image guidance scale s_I.", flag_values=fv
        ),
        seed=flags.DEFINE_integer("seed", 42, "Random seed.", flag_values=fv),
        batch_size=flags.DEFINE_integer(
            "batch-size",
            batch_size,
            "Images per compiled edit call (per image size).",
            flag_values=fv,
        ),
    )

  return _once("sampling", {"batch_size": batch_size}, fv, define)


def define_smartedit_flags(*, flag_values=flags.FLAGS) -> SmartEditFlags:
  """--llm_temperature and --llm_max_new_tokens (a SmartEdit editor's answer), and
  --smartedit_{clip,ip2p,llm_tokenizer,base_llm,step}: the entries of an editor folder's
  smartedit.json (`mre.model_io.smartedit_folder`), given or overridden. Ignored for other models.
  """
  fv = flag_values
  what = {
      "clip": "CLIP (vision) folder, e.g. openai/clip-vit-large-patch14",
      "ip2p": "InstructPix2Pix / SD 1.5 diffusers folder (VAE, CLIP text encoder, scheduler)",
      "llm_tokenizer": "LLaVA/Vicuna tokenizer folder (default: --smartedit_base_llm)",
      "base_llm": "LLaVA/Vicuna folder: the original vocabulary rows",
  }

  def define():
    folders = {
        key: flags.DEFINE_string(
            f"smartedit_{key}", None, f"SmartEdit models: {text}.", flag_values=fv
        )
        for key, text in what.items()
    }
    folders["step"] = flags.DEFINE_integer(
        "smartedit_step",
        None,
        "SmartEdit models: the release folder's step (LLM-<step>/; default: the only one).",
        flag_values=fv,
    )
    return SmartEditFlags(
        temperature=flags.DEFINE_float(
            "llm_temperature",
            0.7,
            "SmartEdit models: the LLM's sampling temperature (0: greedy; 0.7 as the release).",
            flag_values=fv,
        ),
        max_new_tokens=flags.DEFINE_integer(
            "llm_max_new_tokens",
            96,
            "SmartEdit models: the LLM's answer budget in tokens.",
            flag_values=fv,
        ),
        folders=folders,
    )

  return _once("smartedit", {}, fv, define)


def define_judge_flags(*, timeout: float = 120.0, flag_values=flags.FLAGS) -> JudgeFlags:
  """--provider, --base_url, --azure_endpoint, --azure_deployment, --api_version, --api_key_env
  and --timeout: where the judge is. Which judge model to ask stays each command's flag."""
  fv = flag_values

  def define():
    return JudgeFlags(
        provider=flags.DEFINE_enum(
            "provider",
            None,
            list(PROVIDERS),
            "Judge provider (default: azure with "
            "--azure_endpoint, compatible with --base_url, else openai).",
            flag_values=fv,
        ),
        base_url=flags.DEFINE_string(
            "base_url",
            None,
            "OpenAI-compatible judge server, e.g. http://localhost:8000/v1 " "(vLLM, Ollama).",
            flag_values=fv,
        ),
        azure_endpoint=flags.DEFINE_string(
            "azure_endpoint", None, "Azure OpenAI resource endpoint.", flag_values=fv
        ),
        azure_deployment=flags.DEFINE_string(
            "azure_deployment",
            None,
            "Azure OpenAI deployment (sent as the request model).",
            flag_values=fv,
        ),
        api_version=flags.DEFINE_string(
            "api_version", None, "Azure OpenAI api-version.", flag_values=fv
        ),
        api_key_env=flags.DEFINE_string(
            "api_key_env",
            None,
            "Environment variable holding the API key (default "
            "OPENAI_API_KEY, AZURE_OPENAI_API_KEY for Azure).",
            flag_values=fv,
        ),
        timeout=flags.DEFINE_float(
            "timeout", timeout, "Seconds per HTTP attempt to the judge.", flag_values=fv
        ),
    )

  return _once("judge", {"timeout": timeout}, fv, define)
