"""SmartEdit's release layout: a tiny checkpoint written here under the release's keys
(safetensors and .bin) loads, re-exports byte-identical tensors, and every bad key is named."""

import os

import numpy as np
import pytest

from mre.model_io import smartedit_folder as sf
from mre.model_io.safetensors_io import WeightsError, read_safetensors, write_safetensors
from mre.model_io.torch_state_dict import param_paths, torch_layout_shape
from mre.models import smartedit as se
from tests.reference import torch

STEP = 7
CFG = se.tiny_config()


def _shapes(module):
  """{PyTorch name: PyTorch shape} of a module's parameters."""
  return {
      name: torch_layout_shape(tuple(var.shape)) if path[-1] == "kernel" else tuple(var.shape)
      for path, name, var in param_paths(module)
  }


def _lavis(name):
  if name.startswith("layernorm."):
    return "embeddings.LayerNorm." + name[len("layernorm.") :]
  return name.replace(".attention.attention.", ".attention.self.").replace(
      ".crossattention.attention.", ".crossattention.self."
  )


def release_files(seed=0):
  """The four files' tensors under the release's names (renamed here by the release's rules),
  random float32 values of the tiny model's shapes."""
  model = se.abstract_smartedit(CFG)
  rng = np.random.default_rng(seed)
  rand = lambda shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  llm_shapes = _shapes(model.llm)
  llm = {}
  for name, shape in llm_shapes.items():
    if name != "lm_head.weight":
      name = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
      llm["model.base_model.model." + name[len("model.") :]] = rand(shape)
  emb = {"lm_head.weight": rand(llm_shapes["lm_head.weight"])}
  emb.update({"mm_projector." + k: rand(s) for k, s in _shapes(model.mm_projector).items()})
  for k, s in _shapes(model.sd_qformer).items():
    emb["sd_query_tokens" if k == "query_tokens" else "sd_qformer." + _lavis(k)] = rand(s)
  emb["sd_qformer.embeddings.position_ids"] = np.arange(512, dtype=np.int64)[None]
  modulate = {k: rand(s) for k, s in _shapes(model.bim).items()}
  modulate["pe_layer.positional_encoding_gaussian_matrix"] = rand((2, CFG.bim.width // 2))
  unet = {"unet." + k: rand(s) for k, s in _shapes(model.unet).items()}
  return {"llm": llm, "embeddings_qformer": emb, "modulate": modulate, "unet": unet}


def write(folder, files, ext):
  paths = {
      "llm": f"LLM-{STEP}/adapter_model",
      "embeddings_qformer": f"embeddings_qformer/checkpoint-{STEP}_embeddings_qformer",
      "modulate": f"modulate-{STEP}/adapter_model",
      "unet": f"unet-{STEP}/adapter_model",
  }
  for part, tensors in files.items():
    path = os.path.join(folder, paths[part] + ext)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if ext == ".bin":
      torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    else:
      write_safetensors(path, tensors)


def read_back(path):
  if path.endswith(".bin"):
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
  return read_safetensors(path)


@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_release_layout_round_trip_is_byte_identical(tmp_path, ext):
  files = release_files()
  write(str(tmp_path / "release"), files, ext)
  model = sf.load_smartedit_folder(str(tmp_path / "release"), config=CFG)
  written = sf.save_smartedit_folder(model, str(tmp_path / "export"), STEP, ext=ext)
  assert sf.files(str(tmp_path / "export")) == written
  for part, tensors in files.items():
    back = read_back(written[part])
    assert sorted(back) == sorted(tensors), part
    for k, v in tensors.items():
      assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), (part, k)


def test_bad_keys_are_named_in_the_release_spelling(tmp_path):
  files = release_files()
  files["llm"]["model.base_model.model.layers.0.extra.weight"] = np.zeros(3, np.float32)
  del files["llm"]["model.base_model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
  write(str(tmp_path / "a"), files, ".safetensors")
  with pytest.raises(WeightsError) as e:
    sf.load_smartedit_folder(str(tmp_path / "a"), config=CFG)
  assert "model.base_model.model.layers.0.extra.weight" in str(e.value)
  assert "model.base_model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in str(e.value)

  files = release_files()
  files["embeddings_qformer"]["foo.bar"] = np.zeros(1, np.float32)
  write(str(tmp_path / "b"), files, ".safetensors")
  with pytest.raises(WeightsError, match="foo.bar"):
    sf.load_smartedit_folder(str(tmp_path / "b"), config=CFG)

  files = release_files()
  del files["embeddings_qformer"]["sd_query_tokens"]
  files["unet"]["unet.conv_in.weight"] = np.zeros((16, 3, 3, 3), np.float32)
  files["unet"]["conv_out.bias"] = np.zeros(4, np.float32)
  write(str(tmp_path / "c"), files, ".safetensors")
  with pytest.raises(WeightsError, match="sd_query_tokens"):
    sf.load_smartedit_folder(str(tmp_path / "c"), config=CFG)
  files["embeddings_qformer"]["sd_query_tokens"] = np.zeros((1, 6, 24), np.float32)
  write(str(tmp_path / "c"), files, ".safetensors")
  with pytest.raises(WeightsError, match="conv_out.bias"):  # not under unet.
    sf.load_smartedit_folder(str(tmp_path / "c"), config=CFG)
  del files["unet"]["conv_out.bias"]
  write(str(tmp_path / "c"), files, ".safetensors")
  with pytest.raises(WeightsError, match=r"unet.conv_in.weight has shape \(16, 3, 3, 3\)"):
    sf.load_smartedit_folder(str(tmp_path / "c"), config=CFG)
