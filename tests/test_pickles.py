"""The restricted unpickler: loads RLBench files, refuses everything else."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from agnostos.shards.pickles import (
    Demo,
    Observation,
    PickleReadError,
    PickleRefusedError,
    dump_pickle,
    load_pickle,
    make_demo,
    make_observation,
)


def test_real_sample_loads_without_rlbench(sample_root):
    path = sample_root / "open_drawer/all_variations/episodes/episode0/low_dim_obs.pkl"
    demo = load_pickle(path)
    assert isinstance(demo, Demo) and len(demo) == 125
    first = demo[0]
    assert isinstance(first, Observation)
    assert first.gripper_pose.shape == (7,) and first.gripper_pose.dtype == np.float64
    assert first.misc["front_camera_intrinsics"][0, 0] < 0  # RLBench's negative focal length
    assert demo.random_seed[0] == "MT19937" and demo.random_seed[1].shape == (624,)
    assert "rlbench" not in " ".join(name for name in list(__import__("sys").modules))


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_executing_pickle_is_refused_naming_file_and_global(tmp_path):
    path = tmp_path / "low_dim_obs.pkl"
    path.write_bytes(pickle.dumps(_RunsShell(), protocol=4))
    with pytest.raises(PickleRefusedError) as excinfo:
        load_pickle(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "posix.system" in message or "os.system" in message


@pytest.mark.parametrize("payload", [("builtins", "eval"), ("subprocess", "Popen")])
def test_other_dangerous_globals_are_refused(tmp_path, payload):
    module, name = payload
    data = b"\x80\x04" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + b"."
    with pytest.raises(PickleRefusedError, match=f"{module}.{name}"):
        load_pickle(tmp_path / "x.pkl", data=data)


def _demo_with_float32_mask_names() -> Demo:
    observation = make_observation(
        gripper_pose=np.arange(7.0),
        gripper_open=1.0,
        ignore_collisions=np.array(1.0),
        misc={"front_mask_id_to_name": {np.float32(87.0): "jar0"}, "front_camera_near": 0.01},
    )
    return make_demo([observation], np.random.RandomState(3).get_state())


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray", None])
def test_numpy1_and_numpy2_pickles_load(tmp_path, numpy_module):
    data = dump_pickle(_demo_with_float32_mask_names(), numpy_module=numpy_module)
    if numpy_module:
        assert numpy_module.encode() in data
    assert b"rlbench.demo" in data and b"rlbench.backend.observation" in data
    demo = load_pickle(tmp_path / "demo.pkl", data=data)
    observation = demo[0]
    np.testing.assert_array_equal(observation.gripper_pose, np.arange(7.0))
    assert observation.misc["front_mask_id_to_name"][87] == "jar0"  # float32 key hashes as int
    assert float(observation.ignore_collisions) == 1.0
    np.testing.assert_array_equal(demo.random_seed[1], np.random.RandomState(3).get_state()[1])


def test_protocol_2_pickle_of_plain_values_loads(tmp_path):
    value = {"a": [1, 2.5, "x"], "b": (True, None)}
    assert load_pickle(tmp_path / "v.pkl", data=pickle.dumps(value, protocol=2)) == value


def test_truncated_pickle_names_the_file(tmp_path):
    data = dump_pickle(_demo_with_float32_mask_names())
    path = tmp_path / "low_dim_obs.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PickleReadError, match=str(path)):
        load_pickle(path)


def test_missing_pickle_names_the_file(tmp_path):
    with pytest.raises(PickleReadError, match=r"nothing\.pkl"):
        load_pickle(tmp_path / "nothing.pkl")
