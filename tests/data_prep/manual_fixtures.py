"""Tiny manual dirs in the InstructPix2Pix and Real-Edit layouts, with bad inputs on purpose."""

import json
import os

import numpy as np
from PIL import Image

GOOD_REWARD = [
    {"Score": 4, "Negative Prompt": "The cup is still red."},
    {"Score": 3.5, "Negative Prompt": "The table moved."},
    {"Score": 5, "Negative Prompt": "no noticeable issues"},
]


def write_jpeg(path, height=20, width=24, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).convert(mode).save(path, format="JPEG", quality=95)


def ip2p_folder(root, key, seeds, edit="turn the cup blue", size=(20, 24)):
  folder = os.path.join(root, key)
  os.makedirs(folder)
  with open(os.path.join(folder, "prompt.json"), "w") as handle:
    json.dump(
        {"input": "a red cup on a table", "edit": edit, "output": "a blue cup on a table"}, handle
    )
  for seed in seeds:
    for side in (0, 1):
      write_jpeg(os.path.join(folder, f"{seed}_{side}.jpg"), *size, seed=seed * 2 + side)
  return folder


def make_ip2p(root):
  """Good keys k1 (seed 5), k2 (seeds 11 then 3), k5 (edit given as a list), k6 (grayscale JPEGs,
  40x30); bad: k3 (corrupt edited image), k4 (original missing), k7 (prompt.json without edit)."""
  os.makedirs(root)
  ip2p_folder(root, "k1", [5])
  ip2p_folder(root, "k2", [11, 3])
  folder = ip2p_folder(root, "k3", [7])
  with open(os.path.join(folder, "7_1.jpg"), "wb") as handle:
    handle.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
  folder = ip2p_folder(root, "k4", [8])
  os.remove(os.path.join(folder, "8_0.jpg"))
  ip2p_folder(root, "k5", [9], edit=["", "make it snow"])
  folder = ip2p_folder(root, "k6", [])
  for side in (0, 1):
    write_jpeg(os.path.join(folder, f"2_{side}.jpg"), 40, 30, seed=side, mode="L")
  ip2p_folder(root, "k7", [4], edit="")
  seeds = [
      ["k1", [5]],
      ["k2", [11, 3]],
      ["k3", [7]],
      ["k4", [8]],
      ["k5", [9]],
      ["k6", [2]],
      ["k7", [4]],
  ]
  return seeds


def write_json(path, data):
  with open(path, "w") as handle:
    json.dump(data, handle)


def make_real_edit(root):
  """Photos a.jpg (7 instructions, varied formats, one unknown category), b.png (7), c.jpg
  missing, d.jpg corrupt, and an unsafe name."""
  os.makedirs(os.path.join(root, "Real-Edit"))
  write_jpeg(os.path.join(root, "Real-Edit", "a.jpg"), 30, 40, seed=1)
  rng = np.random.default_rng(2)
  Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA").save(
      os.path.join(root, "Real-Edit", "b.png")
  )
  with open(os.path.join(root, "Real-Edit", "d.jpg"), "wb") as handle:
    handle.write(b"\xff\xd8\xff truncated")
  seven = [
      "Local: make the car red",
      "Remove: remove the dog",
      "Add: add a hat to the man",
      "Texture: make the table wooden",
      "Background: put it on a beach",
      "Global: make it night",
      "Style: as a watercolour painting",
  ]
  instructions = {
      "a.jpg": [
          "1. Local: make the car red",
          "2) Remove - remove the dog",
          {"category": "Add", "instruction": "add a hat"},
          "Texture. make the table wooden",
          "Background: on a beach",
          "Weather: make it rain",
          "Style: as a watercolour painting",
      ],
      "b.png": seven,
      "c.jpg": seven,
      "d.jpg": seven,
      "../outside.jpg": seven[:2],
  }
  write_json(os.path.join(root, "real_edit_instruct.json"), instructions)
