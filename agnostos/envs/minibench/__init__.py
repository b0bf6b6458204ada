"""minibench: an embedded MuJoCo tabletop benchmark speaking RLBench's formats.

A Franka Panda (assets from the gymnasium-robotics package), five RLBench-named cameras,
seen and unseen tasks with variations and scripted keyframe demos, written in RLBench's
on-disk layout so the rest of the framework cannot tell it from AGNOSTOS data.
"""

import os

# Offscreen rendering on a CPU: EGL (Mesa llvmpipe) unless the user chose a backend
# (MUJOCO_GL=osmesa also works). It must be set before mujoco is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "osmesa":
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
