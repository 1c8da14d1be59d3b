"""Reading and writing model files; the networks themselves are in `mre.models`.

    safetensors_io    .safetensors files (no torch), and all weights of a model folder
    torch_state_dict  PyTorch state dicts <-> NNX parameters (names, layouts, exhaustive checks)
    diffusers_folder  diffusers pipeline and component folders (and SD 1.5's legacy names, its
                      U-Net widened to 8 input channels)
    reward_layout     the reward U-Net's checkpoint layouts: ours and the released one
    native_format     our own format: Orbax parameters + configs, restored straight into shardings
    folders           which format a folder holds; `load_any` loads either
    word_tokenizer    a CLIP tokenizer folder over a closed word list (the toy world's)
"""
