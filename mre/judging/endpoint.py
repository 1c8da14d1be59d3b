"""Where the judge is: OpenAI, Azure OpenAI or any OpenAI-compatible server, and its API key."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import openai

from mre.judging.errors import JudgeConfigError

PROVIDERS = ("openai", "azure", "compatible")
DEFAULT_MODEL = "gpt-4o"  # the paper's judge
_DEFAULT_KEY_ENV = {
    "openai": "OPENAI_API_KEY",
    "azure": "AZURE_OPENAI_API_KEY",
    "compatible": "OPENAI_API_KEY",
}


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """Where the judge is: OpenAI, Azure OpenAI, or any OpenAI-compatible server (vLLM, Ollama).

  The API key is read from the environment only: `api_key_env` names the variable (default
  OPENAI_API_KEY, or AZURE_OPENAI_API_KEY for Azure). A compatible server may need no key.
  """

  provider: str = "openai"
  base_url: Optional[str] = None  # openai (optional) and compatible (required)
  azure_endpoint: Optional[str] = None  # https://<resource>.openai.azure.com
  azure_deployment: Optional[str] = None  # the deployment name; sent as the request's model
  api_version: Optional[str] = None  # Azure's api-version, e.g. 2024-10-21
  api_key_env: Optional[str] = None
  timeout: float = 120.0  # seconds per HTTP attempt

  def __post_init__(self):
    if self.provider not in PROVIDERS:
      raise ValueError(f"unknown provider {self.provider!r}; expected one of {PROVIDERS}")
    if self.provider == "azure" and not (self.azure_endpoint and self.api_version):
      raise ValueError("the azure provider needs azure_endpoint and api_version")
    if self.provider == "compatible" and not self.base_url:
      raise ValueError("the compatible provider needs base_url (e.g. http://localhost:8000/v1)")

  @property
  def key_env(self) -> str:
    return self.api_key_env or _DEFAULT_KEY_ENV[self.provider]

  def api_key(self) -> str:
    key = os.environ.get(self.key_env, "").strip()
    if key:
      return key
    if self.provider == "compatible" and not self.api_key_env:
      return "EMPTY"  # vLLM's and Ollama's convention for "no key"
    raise JudgeConfigError(f"no API key: set the environment variable {self.key_env}")

  @property
  def batch_url(self) -> str:
    """The `url` of Batch API lines and the batch's `endpoint` (Azure leaves out the /v1)."""
    return "/chat/completions" if self.provider == "azure" else "/v1/chat/completions"

  def request_model(self, model: str) -> str:
    """The `model` a request body carries: Azure routes by deployment name."""
    return (self.azure_deployment or model) if self.provider == "azure" else model

  def describe(self) -> str:
    if self.provider == "azure":
      return f"Azure OpenAI {self.azure_endpoint} (deployment {self.azure_deployment}, api {self.api_version})"
    return f"{self.provider} {self.base_url or 'https://api.openai.com/v1'}"

  def create_client(self, **options) -> openai.OpenAI:
    """An openai client that never retries by itself (JudgeClient does)."""
    common = dict(api_key=self.api_key(), timeout=self.timeout, max_retries=0, **options)
    if self.provider == "azure":
      return openai.AzureOpenAI(
          azure_endpoint=self.azure_endpoint,
          azure_deployment=self.azure_deployment,
          api_version=self.api_version,
          **common,
      )
    return openai.OpenAI(base_url=self.base_url, **common)
