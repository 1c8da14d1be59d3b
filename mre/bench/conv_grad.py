"""The 3 x 3 convolution's kernel gradient three ways, timed in turns on one shape:

  python -m mre.bench.conv_grad                       # the toy's first level: 32 x 24 x 24, 16 -> 16
  python -m mre.bench.conv_grad --size=12 --cin=32 --cout=32

XLA's own (a convolution with a 24 x 24 window over activations transposed to put the batch
last: the toy step's costliest part on a CPU), one matmul of the nine shifted inputs (im2col),
nine matmuls, one per tap, and one matmul over the flattened padded grid (`flat_shift`: no
transpose, nine shifted copies of one side; `mre.bench.levers`' `flat_kernel_grad` puts it into
the whole U-Net). Each is a `jax.custom_vjp` convolution whose forward and input gradient
are XLA's; the figure is forward + both gradients, median ms of `--rounds` rounds in turns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from mre.bench.timing import time_interleaved

_DIMS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS)


def _input_grad(g, w):
  return xla_conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3))


def _shifted(x):
  """The nine 3 x 3 taps of x (zero padded), each [B, H, W, C], in (kh, kw) order."""
  _, h, wd, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i : i + h, j : j + wd, :] for i in range(3) for j in range(3)]


def im2col_kernel_grad(x, g):
  c, co = x.shape[-1], g.shape[-1]
  patches = jnp.concatenate(_shifted(x), axis=-1).reshape(-1, 9 * c)
  return (patches.T @ g.reshape(-1, co)).reshape(3, 3, c, co)


def per_tap_kernel_grad(x, g):
  c, co = x.shape[-1], g.shape[-1]
  taps = [jnp.einsum("bhwc,bhwo->co", s, g) for s in _shifted(x)]
  return jnp.stack(taps).reshape(3, 3, c, co)


def _flat_shift(a, s: int):
  """a [N, C] moved s rows later (s > 0, zeros in front) or -s rows earlier (zeros behind)."""
  if s >= 0:
    return jnp.pad(a[: a.shape[0] - s], ((s, 0), (0, 0)))
  return jnp.pad(a[-s:], ((0, -s), (0, 0)))


def flat_shift_kernel_grad(x, g):
  """In the zero-padded image flattened row by row, kernel tap (i, j) is a shift of the flat index
  by s = i (W + 2) + j, so with g placed on the same grid, dW[i, j] = sum_n x_pad[n + s] g_pad[n]:
  one matmul of x_pad and nine shifted copies of g_pad (or of g_pad and nine copies of x_pad,
  whichever side has fewer channels). A shift never carries a nonzero gradient into the next
  image: the last rows and columns of every image's grid are padding."""
  _, _, wd, c = x.shape
  co = g.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, c)
  gp = jnp.pad(g, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(-1, co)
  shifts = [i * (wd + 2) + j for i in range(3) for j in range(3)]
  if co <= c:
    g9 = jnp.concatenate([_flat_shift(gp, s) for s in shifts], axis=1)  # [N, 9 O]
    return (xp.T @ g9).reshape(c, 3, 3, co).transpose(1, 2, 0, 3)
  x9 = jnp.concatenate([_flat_shift(xp, -s) for s in shifts], axis=1)  # [N, 9 C]
  return (x9.T @ gp).reshape(3, 3, c, co)


def conv_with_kernel_grad(kernel_grad):
  """A convolution whose kernel gradient is `kernel_grad(x, g)`; the rest is XLA's."""

  @jax.custom_vjp
  def conv(x, w):
    return xla_conv(x, w)

  conv.defvjp(
      lambda x, w: (xla_conv(x, w), (x, w)),
      lambda r, g: (_input_grad(g, r[1]), kernel_grad(r[0], g)),
  )
  return conv


VARIANTS = {
    "xla": xla_conv,
    "im2col_matmul": conv_with_kernel_grad(im2col_kernel_grad),
    "per_tap_matmuls": conv_with_kernel_grad(per_tap_kernel_grad),
    "flat_shift": conv_with_kernel_grad(flat_shift_kernel_grad),
}


def flat_shift_conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
  """`jax.lax.conv_general_dilated` as `nnx.Conv` calls it, with `flat_shift`'s kernel gradient for
  the stride-1, 'same'-padded 3 x 3 NHWC convolutions (the `flat_kernel_grad` lever)."""
  same = tuple(tuple(p) for p in padding) == ((1, 1), (1, 1)) if len(padding) == 2 else False
  plain = (
      rhs.shape[:2] == (3, 3)
      and tuple(window_strides) == (1, 1)
      and same
      and kwargs.get("feature_group_count", 1) == 1
      and all(d == 1 for d in kwargs.get("lhs_dilation") or (1, 1))
      and all(d == 1 for d in kwargs.get("rhs_dilation") or (1, 1))
      and tuple(kwargs.get("dimension_numbers") or ()) == _DIMS
  )
  if plain:
    return VARIANTS["flat_shift"](lhs, rhs)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def fwd_bwd(conv, g):
  """jit of (x, w) -> (sum(conv(x, w) * g), d/dx, d/dw)."""
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) * g), argnums=(0, 1)))


def run(batch, size, cin, cout, rounds=20):
  """{variant: median ms} and {variant: largest kernel-gradient difference from XLA's}."""
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (batch, size, size, cin))
  w = 0.1 * jax.random.normal(k[1], (3, 3, cin, cout))
  g = jax.random.normal(k[2], (batch, size, size, cout))
  fns = {name: fwd_bwd(conv, g) for name, conv in VARIANTS.items()}
  outs = {name: jax.block_until_ready(f(x, w)) for name, f in fns.items()}
  ref = outs["xla"][1][1]
  error = {n: float(jnp.max(jnp.abs(o[1][1] - ref))) for n, o in outs.items()}
  calls = {n: (lambda f=f: jax.block_until_ready(f(x, w))) for n, f in fns.items()}
  timings = time_interleaved(calls, warmup=2, reps=rounds)
  return {n: t.median * 1e3 for n, t in timings.items()}, error


def define_flags():
  """The command's flags (defined only when run as a command: other modules have a --size)."""
  flags.DEFINE_integer("batch", 32, "Batch.")
  flags.DEFINE_integer("size", 24, "Height and width.")
  flags.DEFINE_integer("cin", 16, "Input channels.")
  flags.DEFINE_integer("cout", 16, "Output channels.")
  flags.DEFINE_integer("rounds", 20, "Timed rounds (every variant once per round).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  ms, error = run(f.batch, f.size, f.cin, f.cout, f.rounds)
  print(
      f"3x3 conv {f.cin}->{f.cout}, {f.batch} x {f.size} x {f.size}: "
      "forward + input and kernel gradients"
  )
  for name in VARIANTS:
    print(
        f"{name:16s} {ms[name]:8.2f} ms  {ms[name] / ms['xla']:5.2f}x  "
        f"kernel gradient vs XLA's: {error[name]:.1e}"
    )


if __name__ == "__main__":
  define_flags()
  app.run(main)
