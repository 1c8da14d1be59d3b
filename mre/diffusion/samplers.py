"""Samplers whose whole denoising loop is one compiled `lax.fori_loop`, step-equal to diffusers.

Samplers and the diffusers scheduler each one reproduces (same timesteps, same step arithmetic):
  'euler_ancestral'  EulerAncestralDiscreteScheduler   (the Real-Edit default, 30 steps)
  'euler'            EulerDiscreteScheduler            (s_churn = 0, as every pipeline calls it)
  'ddim'             DDIMScheduler                     (eta = 0 deterministic, eta > 0 stochastic)
  'dpmpp_2m'         DPMSolverMultistepScheduler       (algorithm_type 'dpmsolver++', solver_order 2)

`denoise_fn(model_input, t) -> model_output` sees exactly what the pipeline's U-Net sees:
  * the k-diffusion samplers (Euler, Euler-ancestral) feed x / sqrt(sigma^2 + 1) (diffusers'
    `scale_model_input`) and a float32 timestep, fractional under 'linspace' spacing;
  * DDIM and DPM-Solver++ feed x unchanged and an int32 timestep.
The initial latents passed to `sample` must already be multiplied by `init_noise_sigma` (the pipeline
does `randn * scheduler.init_noise_sigma`); see `mre.diffusion.editing.edit_latents`.

Timestep tables depend only on static settings and are built with numpy; anything that depends on
the (traced) `alphas_cumprod` is computed with jnp in float32, the precision diffusers uses.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mre.diffusion.schedule import NoiseSchedule, resolve_prediction_type

SAMPLERS = ("euler_ancestral", "euler", "ddim", "dpmpp_2m")
K_DIFFUSION_SAMPLERS = ("euler_ancestral", "euler")  # they scale the model input and the init noise
STOCHASTIC_SAMPLERS = ("euler_ancestral", "ddim")  # ddim only with eta > 0

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_sampler(sampler: str) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler: unsupported value {sampler!r}; expected one of {SAMPLERS}")


def timestep_spacing(schedule: NoiseSchedule, sampler: str) -> str:
  """The spacing diffusers uses: the config's, else the scheduler class default. The defaults differ:
  DDIMScheduler defaults to 'leading', the Euler and DPM-Solver schedulers to 'linspace'. An SD 1.5
  scheduler_config.json has no `timestep_spacing` key, so its Euler sampling is 'linspace'
  (timesteps 999, 964.55, ...) even though it carries steps_offset 1."""
  _check_sampler(sampler)
  if schedule.timestep_spacing is not None:
    return schedule.timestep_spacing
  return "leading" if sampler == "ddim" else "linspace"


# --- timesteps and sigmas, as diffusers' set_timesteps computes them -----------------------------


def sampling_timesteps(schedule: NoiseSchedule, num_steps: int, sampler: str) -> np.ndarray:
  """`scheduler.timesteps` after `set_timesteps(num_steps)`: float32 for the Euler samplers,
  int64 for DDIM and DPM-Solver++. Static (numpy): it depends on settings only."""
  spacing = timestep_spacing(schedule, sampler)
  train_steps, offset, n = schedule.num_train_timesteps, schedule.steps_offset, num_steps
  if n < 1 or n > train_steps:
    raise ValueError(f"num_steps: must be in [1, {train_steps}], got {n}")
  if sampler == "dpmpp_2m":
    # DPM-Solver places n + 1 points and drops the last (t = 0) for linspace/leading.
    if spacing == "linspace":
      steps = np.linspace(0, train_steps - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
      steps = (np.arange(0, n + 1) * (train_steps // (n + 1))).round()[::-1][:-1] + offset
    else:
      steps = np.arange(train_steps, 0, -train_steps / n).round() - 1
    return steps.astype(np.int64)
  if spacing == "linspace":
    steps = np.linspace(0, train_steps - 1, n)[::-1]
    if sampler == "ddim":
      steps = steps.round()
  elif spacing == "leading":
    steps = (np.arange(0, n) * (train_steps // n)).round()[::-1] + offset
  else:
    steps = np.arange(train_steps, 0, -train_steps / n).round() - 1
  dtype = np.int64 if sampler == "ddim" else np.float32
  return np.ascontiguousarray(steps).astype(dtype)


def _train_sigmas(schedule: NoiseSchedule) -> jax.Array:
  """k-diffusion sigmas sqrt((1 - alpha_bar) / alpha_bar) at every training timestep, float32."""
  alphas_cumprod = schedule.alphas_cumprod
  return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sampling_sigmas(schedule: NoiseSchedule, num_steps: int, sampler: str) -> jax.Array:
  """`scheduler.sigmas` after `set_timesteps`: sigma at each timestep (linearly interpolated in t
  for fractional timesteps) followed by the final sigma, float32 [num_steps + 1]."""
  if sampler == "ddim":
    raise ValueError("sampler: 'ddim' is parameterised by alphas_cumprod, it has no sigma table")
  timesteps = sampling_timesteps(schedule, num_steps, sampler).astype(np.float64)
  train_sigmas = _train_sigmas(schedule)
  low = np.clip(np.floor(timesteps), 0, schedule.num_train_timesteps - 1).astype(np.int32)
  high = np.minimum(low + 1, schedule.num_train_timesteps - 1)
  weight = jnp.asarray(timesteps - low, dtype=jnp.float32)
  sigmas = train_sigmas[low] + weight * (train_sigmas[high] - train_sigmas[low])
  # Euler-ancestral always ends at 0; Euler and DPM-Solver++ may end at the smallest train sigma.
  if sampler != "euler_ancestral" and schedule.final_sigmas_type == "sigma_min":
    last = train_sigmas[0]
  else:
    last = jnp.zeros((), jnp.float32)
  return jnp.concatenate([sigmas, last[None]])


def init_noise_sigma(schedule: NoiseSchedule, num_steps: int, sampler: str) -> jax.Array:
  """Standard deviation of the initial latents: sigma_max for the Euler samplers, but
  sqrt(sigma_max^2 + 1) under 'leading' spacing (diffusers' rule); 1 for DDIM and DPM-Solver++."""
  _check_sampler(sampler)
  if sampler not in K_DIFFUSION_SAMPLERS:
    return jnp.ones((), jnp.float32)
  sigma_max = jnp.max(sampling_sigmas(schedule, num_steps, sampler))
  if timestep_spacing(schedule, sampler) == "leading":
    return (sigma_max**2 + 1) ** 0.5
  return sigma_max


def _ddim_alphas(schedule: NoiseSchedule, num_steps: int):
  """alpha_bar at each DDIM timestep and at its predecessor t - T // n (diffusers' rule, whatever
  the spacing); below t = 0 the predecessor is 1 (set_alpha_to_one) or alpha_bar[0]."""
  timesteps = sampling_timesteps(schedule, num_steps, "ddim")
  previous = timesteps - schedule.num_train_timesteps // num_steps
  alphas_cumprod = schedule.alphas_cumprod
  set_alpha_to_one = True if schedule.set_alpha_to_one is None else schedule.set_alpha_to_one
  final = jnp.ones((), jnp.float32) if set_alpha_to_one else alphas_cumprod[0]
  alpha_bar = alphas_cumprod[timesteps.astype(np.int32)]
  alpha_bar_prev = jnp.where(
      previous >= 0, alphas_cumprod[np.maximum(previous, 0).astype(np.int32)], final
  )
  return alpha_bar, alpha_bar_prev


def _dpm_first_order_steps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
  """Which DPM-Solver++ 2M steps fall back to first order: the first (no history yet) and the last
  when diffusers lowers the final order (final sigma 0, euler_at_final, or < 15 steps)."""
  first = np.zeros(num_steps, dtype=bool)
  first[0] = True
  if (
      schedule.euler_at_final
      or (schedule.lower_order_final and num_steps < 15)
      or schedule.final_sigmas_type == "zero"
  ):
    first[-1] = True
  return first


# --- single steps (pure; scalars may be traced) ---------------------------------------------------


def _x0_from_k_output(x, model_output, sigma, prediction_type):
  """Predicted clean sample for the k-diffusion parameterisation x = x0 + sigma * eps."""
  if prediction_type == "epsilon":
    return x - sigma * model_output
  if prediction_type == "sample":
    return model_output
  return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def euler_ancestral_step(x, model_output, sigma, sigma_next, noise, prediction_type="epsilon"):
  """One EulerAncestralDiscreteScheduler.step: an Euler step down to sigma_down, then fresh noise
  of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2."""
  x0 = _x0_from_k_output(x, model_output, sigma, prediction_type)
  sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
  sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
  derivative = (x - x0) / sigma
  x = x + derivative * (sigma_down - sigma)
  return x + noise * sigma_up


def euler_step(x, model_output, sigma, sigma_next, prediction_type="epsilon"):
  """One EulerDiscreteScheduler.step (no churn): x + (x - x0) / sigma * (sigma_next - sigma)."""
  x0 = _x0_from_k_output(x, model_output, sigma, prediction_type)
  derivative = (x - x0) / sigma
  return x + derivative * (sigma_next - sigma)


def ddim_step(
    x,
    model_output,
    alpha_bar,
    alpha_bar_prev,
    noise=None,
    eta=0.0,
    prediction_type="epsilon",
    clip_sample_range: Optional[float] = None,
):
  """One DDIMScheduler.step (Song et al. eq. 12). `noise` is the variance noise, used when given;
  it is scaled by std = eta * sqrt(variance), so eta = 0 adds nothing."""
  beta = 1 - alpha_bar
  if prediction_type == "epsilon":
    x0 = (x - beta**0.5 * model_output) / alpha_bar**0.5
    eps = model_output
  elif prediction_type == "sample":
    x0 = model_output
    eps = (x - alpha_bar**0.5 * x0) / beta**0.5
  else:
    x0 = alpha_bar**0.5 * x - beta**0.5 * model_output
    eps = alpha_bar**0.5 * model_output + beta**0.5 * x
  if clip_sample_range is not None:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
  variance = (1 - alpha_bar_prev) / beta * (1 - alpha_bar / alpha_bar_prev)
  std = eta * variance**0.5
  x_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - std**2) ** 0.5 * eps
  if noise is not None:
    x_prev = x_prev + std * noise
  return x_prev


def _alpha_sigma(sigma):
  """(alpha_t, sigma_t) of the variance-preserving process with k-diffusion sigma."""
  alpha = 1 / (sigma**2 + 1) ** 0.5
  return alpha, sigma * alpha


def dpmpp_2m_step(
    x, model_output, prev_x0, sigma_prev, sigma, sigma_next, first_order, prediction_type="epsilon"
):
  """One DPMSolverMultistepScheduler.step with dpmsolver++, midpoint, order 2.

  Returns (x_next, x0): x0 is this step's data prediction, the next step's `prev_x0`.
  `first_order` (bool, may be traced) selects the DPM-Solver++ 1 update (= DDIM).
  """
  alpha_s0, sigma_s0 = _alpha_sigma(sigma)
  alpha_s1, sigma_s1 = _alpha_sigma(sigma_prev)
  alpha_t, sigma_t = _alpha_sigma(sigma_next)
  if prediction_type == "epsilon":
    x0 = (x - sigma_s0 * model_output) / alpha_s0
  elif prediction_type == "sample":
    x0 = model_output
  else:
    x0 = alpha_s0 * x - sigma_s0 * model_output
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)  # +inf at the final sigma 0: exp(-h) = 0 below
  lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
  lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
  h = lambda_t - lambda_s0
  r0 = jnp.where(first_order, 1.0, (lambda_s0 - lambda_s1) / h)  # no 0/0 on first-order steps
  phi = alpha_t * (jnp.exp(-h) - 1.0)
  x_next = sigma_t / sigma_s0 * x - phi * x0
  second_order_term = 0.5 * phi * (1.0 / r0 * (x0 - prev_x0))
  x_next = x_next - jnp.where(first_order, jnp.zeros_like(x_next), second_order_term)
  return x_next, x0


# --- the compiled loops ---------------------------------------------------------------------------


def _step_noise_source(noise, key, latents, num_steps):
  """i -> the noise of step i: rows of a pre-drawn [num_steps, ...] array, or drawn from `key`."""
  if noise is not None:
    noise = jnp.asarray(noise, latents.dtype)
    if noise.shape != (num_steps,) + latents.shape:
      raise ValueError(f"noise: expected shape {(num_steps,) + latents.shape}, got {noise.shape}")
    return lambda i: noise[i]
  if key is None:
    raise ValueError("key: a stochastic sampler needs `key` or a pre-drawn `noise` array")
  return lambda i: jax.random.normal(jax.random.fold_in(key, i), latents.shape, latents.dtype)


def _is_zero(value) -> bool:
  return isinstance(value, numbers.Real) and value == 0


def sample(
    denoise_fn: DenoiseFn,
    latents: jax.Array,
    schedule: NoiseSchedule,
    num_steps: int,
    key: Optional[jax.Array] = None,
    *,
    sampler: str = "euler_ancestral",
    prediction_type: Optional[str] = None,
    eta: float = 0.0,
    noise: Optional[jax.Array] = None,
    state=None,
) -> jax.Array:
  """Runs the full reverse process from `latents` (already scaled by `init_noise_sigma`) and
  returns the final latents. The loop is one `lax.fori_loop`: `denoise_fn` is traced once.

  Args:
    denoise_fn: (model_input, t) -> model output (epsilon or v), same shape as `latents`.
    num_steps, sampler: static. prediction_type: defaults to the schedule's.
    eta: DDIM only (0 = deterministic). key / noise: the per-step noise of the stochastic samplers
      (Euler-ancestral; DDIM with eta != 0): `noise[i]` if a [num_steps, *latents.shape] array is
      given, else `normal(fold_in(key, i))`. Deterministic samplers ignore both.
    state: optional pytree carried from step to step (self-conditioning's previous x0
      estimates): `denoise_fn` is then `(model_input, t, state) -> (model output, new state)`.
  """
  _check_sampler(sampler)
  prediction_type = resolve_prediction_type(schedule, prediction_type)
  timesteps = sampling_timesteps(schedule, num_steps, sampler)
  n = len(timesteps)
  stochastic = sampler == "euler_ancestral" or (sampler == "ddim" and not _is_zero(eta))
  step_noise = _step_noise_source(noise, key, latents, n) if stochastic else None
  # What the pipeline hands the U-Net: float timesteps for Euler, integers for DDIM / DPM-Solver.
  model_timesteps = jnp.asarray(
      timesteps.astype(np.int32 if timesteps.dtype == np.int64 else np.float32)
  )
  dtype = latents.dtype

  # Without a state the loops carry `state=None` (an empty pytree) and the model ignores it.
  def model_output_at(i, model_input, state):
    if state is None:
      return denoise_fn(model_input, model_timesteps[i]).astype(dtype), None
    out, state = denoise_fn(model_input, model_timesteps[i], state)
    return out.astype(dtype), state

  if sampler in K_DIFFUSION_SAMPLERS:
    sigmas = sampling_sigmas(schedule, num_steps, sampler)

    def k_body(i, carry):
      x, state = carry
      sigma, sigma_next = sigmas[i], sigmas[i + 1]
      out, state = model_output_at(i, x / (sigma**2 + 1) ** 0.5, state)
      if sampler == "euler_ancestral":
        x = euler_ancestral_step(x, out, sigma, sigma_next, step_noise(i), prediction_type)
      else:
        x = euler_step(x, out, sigma, sigma_next, prediction_type)
      return x.astype(dtype), state

    return jax.lax.fori_loop(0, n, k_body, (latents, state))[0]

  if sampler == "ddim":
    alpha_bar, alpha_bar_prev = _ddim_alphas(schedule, num_steps)
    clip = True if schedule.clip_sample is None else schedule.clip_sample
    clip_range = schedule.clip_sample_range if clip else None

    def ddim_body(i, carry):
      x, state = carry
      out, state = model_output_at(i, x, state)
      x = ddim_step(
          x,
          out,
          alpha_bar[i],
          alpha_bar_prev[i],
          noise=None if step_noise is None else step_noise(i),
          eta=eta,
          prediction_type=prediction_type,
          clip_sample_range=clip_range,
      )
      return x.astype(dtype), state

    return jax.lax.fori_loop(0, n, ddim_body, (latents, state))[0]

  sigmas = sampling_sigmas(schedule, num_steps, sampler)
  first_order = jnp.asarray(_dpm_first_order_steps(schedule, n))

  def dpm_body(i, carry):
    x, prev_x0, state = carry
    out, state = model_output_at(i, x, state)
    x, x0 = dpmpp_2m_step(
        x,
        out,
        prev_x0,
        sigmas[jnp.maximum(i - 1, 0)],
        sigmas[i],
        sigmas[i + 1],
        first_order[i],
        prediction_type,
    )
    return x.astype(dtype), x0.astype(dtype), state

  return jax.lax.fori_loop(0, n, dpm_body, (latents, jnp.zeros_like(latents), state))[0]
