"""Models: the dynamics diffusion model and the tiny offline base.

- `dynamics_diffusion.py`: X-ICM's InstructPix2Pix-style dynamics model (diffusers), its
  sampling, feature extraction conventions and export;
- `tiny.py`: a tiny Stable-Diffusion-shaped base built from configs, for CPUs and tests.
"""
