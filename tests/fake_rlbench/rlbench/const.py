from pyrep.robots.arms.panda import Panda
from pyrep.robots.end_effectors.panda_gripper import PandaGripper

# robot name -> (arm class, gripper class, number of arm joints), as in `rlbench/const.py`
SUPPORTED_ROBOTS = {"panda": (Panda, PandaGripper, 7)}
