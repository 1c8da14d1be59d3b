"""The toy editing world: scenes, instructions, flawed edit targets and a judge in GPT-4o's place.

Everything the paper needs (annotation -> dataset -> training -> evaluation) replays here on a CPU
with no data, weights or API to download:

    scenes        flat-colour shapes rendered exactly (`random_scene`, `render`, `recover_scene`)
    instructions  templated edit instructions per Real-Edit category (`sample_edit`, `parse_instruction`)
    flaws         InstructPix2Pix-like damaged targets (`FlawMix`, `make_flawed_target`)
    judge         three-perspective scores and failure texts (`judge`, `judge_quality`)
    judge_server  the judge behind an OpenAI-compatible HTTP API (`serve_in_thread`, CLI)
    judge_report  the judge's mean scores per failure mode (CLI, Markdown table)
    vocabulary    the closed word list of instructions and judge texts (`vocabulary`)

The dataset built from it is `data_prep.toy_edit` (TFDS); the prompts both judges answer are in
`mre.judging.prompts`.
"""
