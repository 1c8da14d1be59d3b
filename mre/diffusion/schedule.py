"""DDPM noise schedule, forward process and training targets, read from diffusers configs.

The schedule is a `NoiseSchedule`: a frozen pytree whose arrays (`betas`, `alphas_cumprod`) are traced
under `jax.jit` and whose scheduler settings (timestep spacing, offsets, ...) are static metadata, so
one compiled sampler serves any schedule with the same settings.

Numerics follow diffusers bit for bit where it matters: betas are float32 (diffusers builds them with
`torch.linspace(..., dtype=float32)`), and the cumulative product is accumulated in float64 and then
rounded to float32 (torch's CPU `cumprod` accumulates float32 in double). Accumulating in float32
instead drifts by ~1e-6 relative over 1000 steps, which is visible at sigma_max ~ 14.6.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # "sample": the clean x0 itself
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@struct.dataclass
class NoiseSchedule:
  """A discrete DDPM schedule plus the scheduler settings the samplers need.

  Arrays (traced under jit): `betas` and `alphas_cumprod`, float32, shape [num_train_timesteps].
  Static fields mirror diffusers scheduler-config keys; `None` means "the diffusers class default of
  whichever scheduler samples with it" (e.g. DDIM's default spacing is 'leading', Euler's 'linspace';
  DDIM's default `clip_sample` is True), exactly as diffusers treats a key missing from a config.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
  beta_schedule: str = struct.field(pytree_node=False, default="linear")
  beta_start: float = struct.field(pytree_node=False, default=0.0001)
  beta_end: float = struct.field(pytree_node=False, default=0.02)
  trained_betas: Optional[tuple] = struct.field(pytree_node=False, default=None)
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  timestep_spacing: Optional[str] = struct.field(pytree_node=False, default=None)
  steps_offset: int = struct.field(pytree_node=False, default=0)
  # DDIM
  set_alpha_to_one: Optional[bool] = struct.field(pytree_node=False, default=None)
  clip_sample: Optional[bool] = struct.field(pytree_node=False, default=None)
  clip_sample_range: float = struct.field(pytree_node=False, default=1.0)
  # Euler / DPM-Solver++
  final_sigmas_type: str = struct.field(pytree_node=False, default="zero")
  lower_order_final: bool = struct.field(pytree_node=False, default=True)
  euler_at_final: bool = struct.field(pytree_node=False, default=False)


def _alpha_bar_cosine(t: float) -> float:
  return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas=None,
) -> np.ndarray:
  """Betas as diffusers builds them, float32 [num_train_timesteps]."""
  n = num_train_timesteps
  if trained_betas is not None:
    return np.asarray(trained_betas, dtype=np.float32)
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, n).astype(np.float32)
  if beta_schedule == "scaled_linear":
    # Linear in sqrt(beta), squared in float32 like `torch.linspace(...)**2`.
    root = np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32)
    return root * root
  if beta_schedule == "squaredcos_cap_v2":
    # Nichol & Dhariwal cosine schedule, beta capped at 0.999 (computed in float64 like diffusers).
    betas = [
        min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999) for i in range(n)
    ]
    return np.asarray(betas, dtype=np.float32)
  raise ValueError(
      f"beta_schedule: unsupported value {beta_schedule!r}; expected one of {BETA_SCHEDULES}"
  )


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
  """prod_{s<=t} (1 - beta_s): float32 alphas, accumulated in float64, rounded to float32."""
  alphas = np.float32(1.0) - np.asarray(betas, dtype=np.float32)
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def make_schedule(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    **settings: Any,
) -> NoiseSchedule:
  """Builds a schedule; the defaults are Stable Diffusion 1.x's. `settings` are NoiseSchedule fields."""
  return schedule_from_config(
      dict(
          beta_schedule=beta_schedule,
          beta_start=beta_start,
          beta_end=beta_end,
          num_train_timesteps=num_train_timesteps,
          **settings,
      )
  )


# --- diffusers scheduler_config.json ------------------------------------------------------------

# Keys whose value changes the arithmetic in a way these samplers do not implement. The value on the
# right is the only one accepted (diffusers' default); anything else is an error naming the key.
_MUST_BE_DEFAULT = {
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "solver_order": 2,
}


def _check_choice(key: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f"{key}: unsupported value {value!r}; expected one of {choices}")


def check_prediction_type(prediction_type: Any) -> str:
  """What the network predicts: one of PREDICTION_TYPES, else a ValueError naming the key. Every
  reader of a prediction type (configs, schedules, targets, samplers) checks it here."""
  _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
  return prediction_type


def resolve_prediction_type(schedule: NoiseSchedule, prediction_type: Optional[str] = None) -> str:
  """`prediction_type` when given, else the schedule's; checked."""
  return check_prediction_type(prediction_type or schedule.prediction_type)


def _read_config(config: Union[Mapping[str, Any], str, os.PathLike]) -> dict:
  if isinstance(config, Mapping):
    return dict(config)
  path = os.fspath(config)
  if os.path.isdir(path):
    nested = os.path.join(path, "scheduler", "scheduler_config.json")
    direct = os.path.join(path, "scheduler_config.json")
    path = direct if os.path.exists(direct) or not os.path.exists(nested) else nested
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def schedule_from_config(config: Union[Mapping[str, Any], str, os.PathLike]) -> NoiseSchedule:
  """A NoiseSchedule from a diffusers scheduler config: a dict, a scheduler_config.json, a folder
  holding one, or a pipeline folder with `scheduler/scheduler_config.json`.

  Keys belonging to other schedulers (`skip_prk_steps`, `_class_name`, ...) are ignored; keys whose
  value would change the arithmetic in an unsupported way raise a ValueError naming the key.
  Missing keys take diffusers' scheduler defaults (beta_schedule 'linear', 0.0001..0.02, ...).
  """
  cfg = _read_config(config)
  for key, default in _MUST_BE_DEFAULT.items():
    if key in cfg and cfg[key] is not None and cfg[key] != default:
      raise ValueError(f"{key}: unsupported value {cfg[key]!r}; only {default!r} is implemented")
  if cfg.get("variance_type") in ("learned", "learned_range"):
    raise ValueError(f"variance_type: unsupported value {cfg['variance_type']!r}")
  lambda_min = cfg.get("lambda_min_clipped")
  if lambda_min is not None and math.isfinite(float(lambda_min)):
    raise ValueError(
        f"lambda_min_clipped: unsupported value {lambda_min!r}; only -inf is implemented"
    )

  num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
  beta_schedule = cfg.get("beta_schedule", "linear")
  beta_start = float(cfg.get("beta_start", 0.0001))
  beta_end = float(cfg.get("beta_end", 0.02))
  trained_betas = cfg.get("trained_betas")
  if trained_betas is None:
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
  else:
    trained_betas = tuple(float(b) for b in np.asarray(trained_betas).reshape(-1))
    if len(trained_betas) != num_train_timesteps:
      raise ValueError(
          f"trained_betas: has {len(trained_betas)} values but num_train_timesteps is "
          f"{num_train_timesteps}"
      )
  prediction_type = check_prediction_type(cfg.get("prediction_type", "epsilon"))
  timestep_spacing = cfg.get("timestep_spacing")
  if timestep_spacing is not None:
    _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
  final_sigmas_type = cfg.get("final_sigmas_type", "zero")
  _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)

  betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
  optional_bool = lambda key: None if cfg.get(key) is None else bool(cfg[key])  # noqa: E731
  return NoiseSchedule(
      betas=jnp.asarray(betas),
      alphas_cumprod=jnp.asarray(alphas_cumprod_from_betas(betas)),
      num_train_timesteps=num_train_timesteps,
      beta_schedule=beta_schedule,
      beta_start=beta_start,
      beta_end=beta_end,
      trained_betas=trained_betas,
      prediction_type=prediction_type,
      timestep_spacing=timestep_spacing,
      steps_offset=int(cfg.get("steps_offset", 0)),
      set_alpha_to_one=optional_bool("set_alpha_to_one"),
      clip_sample=optional_bool("clip_sample"),
      clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
      final_sigmas_type=final_sigmas_type,
      lower_order_final=bool(cfg.get("lower_order_final", True)),
      euler_at_final=bool(cfg.get("euler_at_final", False)),
  )


# --- forward process and training targets --------------------------------------------------------


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example scalars [B] to broadcast against `like` [B, ...]."""
  values = jnp.asarray(values)
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _signal_noise_scales(schedule: NoiseSchedule, t: jax.Array, like: jax.Array):
  alpha_bar = schedule.alphas_cumprod[jnp.asarray(t)].astype(like.dtype)
  return _per_example(alpha_bar**0.5, like), _per_example((1 - alpha_bar) ** 0.5, like)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; t: int [B] (or scalar)."""
  signal, sigma = _signal_noise_scales(schedule, t, x0)
  return signal * x0 + sigma * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v-prediction target: v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
  signal, sigma = _signal_noise_scales(schedule, t, x0)
  return signal * noise - sigma * x0


def training_target(
    schedule: NoiseSchedule,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    prediction_type: Optional[str] = None,
) -> jax.Array:
  """What the network regresses: the noise ('epsilon'), the velocity ('v_prediction') or the clean
  sample itself ('sample'). `prediction_type` defaults to the schedule's."""
  prediction_type = resolve_prediction_type(schedule, prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "sample":
    return x0
  return velocity(schedule, x0, noise, t)  # v_prediction


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps t."""
  alpha_bar = schedule.alphas_cumprod[jnp.asarray(t)]
  return alpha_bar / (1 - alpha_bar)


def edm_weight(schedule: NoiseSchedule, t: jax.Array, sigma_data: float, cap: float) -> jax.Array:
  """Per-example x0-error weights that make the loss EDM's (Karras et al. 2022) on the network
  output F of the preconditioned denoiser (1 / c_out^2, here divided by 1 / sigma_data^2 so that
  pure noise weighs 1): 1 + sigma_data^2 * SNR, capped at `cap` (the lowest noise levels, where
  c_out -> 0, would otherwise take over the loss)."""
  return jnp.minimum(1.0 + sigma_data**2 * snr(schedule, t), cap)


def min_snr_weight(
    schedule: NoiseSchedule,
    t: jax.Array,
    gamma: float = 5.0,
    prediction_type: Optional[str] = None,
) -> jax.Array:
  """Per-example MSE weights of Min-SNR-gamma (Hang et al. 2023), as in diffusers' training scripts.

  The weight min(SNR, gamma) applies to the x0 error; expressed on the regressed target it becomes
  min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction and
  min(SNR, gamma) itself for 'sample' (the target is x0).
  """
  prediction_type = resolve_prediction_type(schedule, prediction_type)
  ratio = snr(schedule, t)
  clipped = jnp.minimum(ratio, gamma)
  if prediction_type == "epsilon":
    return clipped / ratio
  if prediction_type == "sample":
    return clipped
  return clipped / (ratio + 1)  # v_prediction
