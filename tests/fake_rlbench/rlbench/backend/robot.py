class Robot:
    """Simple container for the robot components (`rlbench/backend/robot.py`)."""

    def __init__(self, arm, gripper):
        self.arm = arm
        self.gripper = gripper
