"""The x0-estimate probe (mre/experiments/denoiser_probe.py), on an editor whose answer is known."""

import numpy as np
import pytest
from flax import nnx

from configs import ip2p, reward
from data_prep.toy.judge import quality
from data_prep.toy.judge.view import EditView
from mre import evaluation, model_setup
from mre.experiments.denoiser_probe import probe
from mre.models.reward_unet import RewardUNet


@pytest.mark.parametrize("recipe", [ip2p, reward])
def test_a_source_copying_editor_is_wrong_inside_the_edit_at_every_noise_level(
    recipe, tmp_path, toy_data
):
  """With the source skip and a zero output layer the x0 estimate is the source itself: its error
  is |ideal - source| inside the edited region, exactly 0 next to it, and the blur of the sources,
  at every t (a reward editor: at the perfect reward)."""
  from data_prep.toy.vocabulary import vocabulary  # pylint: disable=import-outside-toplevel

  c = recipe.get_config("toy")
  c.model.reward.score_dim, c.model.reward.heads = 8, 2
  c.model.scratch.unet_channels, c.model.scratch.text_hidden = (8, 16), 16
  c.model.scratch.heads, c.model.scratch.text_heads = 2, 2
  c.data.resolution = 16
  pipe = model_setup.build_scratch(c, vocabulary(), str(tmp_path / "tok"), abstract=False)
  assert isinstance(pipe.unet, RewardUNet) == (recipe is reward)
  out = pipe.unet.pixel_head.fc_out  # the toy recipe's output layer (zero at the start anyway)
  out.kernel[...] = out.kernel[...] * 0
  out.bias[...] = out.bias[...] * 0
  got = probe(
      pipe,
      category="local",
      items=3,
      timesteps=(999, 10),
      data_dir=toy_data,
      dataset="toy_edit/tiny",
  )
  items = [
      i
      for i in evaluation.load_benchmark("toy_edit/tiny", toy_data, "test")
      if i.category == "local"
  ][:3]
  src = np.stack([i.original for i in items]).astype(np.float32) / 127.5 - 1
  ideal = np.stack([EditView(i.instruction, i.original, i.original).ideal for i in items])
  ideal = ideal.astype(np.float32) / 127.5 - 1
  region = np.linalg.norm(ideal - src, axis=-1) > 0.1
  inside = np.linalg.norm(ideal - src, axis=-1)[region].mean()
  blur = np.mean([quality.quality_levels(i.original)["blur"] for i in items])
  for t in (999, 10):
    assert got[t]["inside"] == pytest.approx(inside, rel=1e-4)
    assert got[t]["next_to_edge"] == pytest.approx(0.0, abs=1e-5)
    assert got[t]["blur"] == pytest.approx(blur, abs=1e-6)
  with pytest.raises(ValueError, match="no 'nothing'"):
    probe(pipe, category="nothing", data_dir=toy_data, dataset="toy_edit/tiny")
