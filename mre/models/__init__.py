"""The networks, Flax NNX, one per file; reading and writing their weights is `mre.model_io`.

    unet, unet_blocks  SD 1.x `UNet2DConditionModel`       layers  shared building blocks
    vae                AutoencoderKL                        config  their validated config.json settings
    clip_text          the CLIP text encoder                pixel   pixel space for the toy editors
    reward, reward_unet  multi-reward conditioning (paper and released forms)
"""
