"""Models: the dynamics diffusion model, the VLA policy and their tiny offline bases.

- `dynamics_diffusion.py`: X-ICM's InstructPix2Pix-style dynamics model (diffusers), its
  sampling, feature extraction conventions and export;
- `tiny.py`: a tiny Stable-Diffusion-shaped base built from configs, for CPUs and tests;
- `vla.py`: `VLAPolicy`, a Qwen2.5-VL or SmolVLM backbone with a prompt format and an action
  codec (X-ICM 7-integer text or OpenVLA-style bin tokens), LoRA, export and merge; its
  parts are `vla_backbones.py` (families, PIL image inputs, chat frame), `vla_replies.py`
  (prompt text, reply formats and parsing) and `vla_export.py` (`vla.json`, model card);
- `tiny_vla.py`: tiny random Qwen2.5-VL / SmolVLM model directories with an offline
  tokenizer, loaded by `VLAPolicy.from_base` like real checkpoints;
- `tiny_llm.py` (with `byte_level_bpe`, the offline tokenizer both tiny chat models use),
  `llm*.py`, `smollm2.py`: the chat LLM backends of the X-ICM agent.
"""
