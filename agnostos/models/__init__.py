"""Models: dynamics diffusion, VLA wrappers, action codecs and LLM backends."""
