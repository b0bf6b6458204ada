"""The restricted unpickler: one class, two allowlists (RLBench episode pickles, X-ICM's
features pickle); each loads its real inputs and refuses everything else, naming the file."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from xicm_layout import xicm_features

from agnostos.evaluation.bank import BankError, load_xicm_pickle
from agnostos.shards.pickles import (
    RLBENCH_ALLOWLIST,
    XICM_FEATURES_ALLOWLIST,
    Demo,
    Observation,
    PickleAllowlist,
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
    modules = __import__("sys").modules  # the real package, not agnostos.envs.rlbench
    assert not any(name == "rlbench" or name.startswith("rlbench.") for name in modules)


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


# --------------------------------------------------------------------------- both allowlists


def test_every_real_sample_pickle_loads_with_the_rlbench_allowlist(sample_root):
    """All three pickles of each real episode: the Demo, the instructions, the variation
    (episode0 is variation 2, the top drawer; episode1 variation 1, the middle one)."""
    folders = sample_root / "open_drawer/all_variations/episodes"
    for episode, variation, drawer in ((0, 2, "top"), (1, 1, "middle")):
        folder = folders / f"episode{episode}"
        demo = load_pickle(folder / "low_dim_obs.pkl", allowlist=RLBENCH_ALLOWLIST)
        assert isinstance(demo, Demo) and isinstance(demo[0], Observation)
        descriptions = load_pickle(folder / "variation_descriptions.pkl")
        assert descriptions[0] == f"open the {drawer} drawer" and len(descriptions) == 3
        number = load_pickle(folder / "variation_number.pkl")
        assert type(number) is int and number == variation


def test_features_allowlist_refuses_the_rlbench_classes(sample_root):
    """The X-ICM allowlist is the narrower one: an episode pickle is not a features file."""
    path = sample_root / "open_drawer/all_variations/episodes/episode0/low_dim_obs.pkl"
    with pytest.raises(PickleRefusedError) as excinfo:
        load_pickle(path, allowlist=XICM_FEATURES_ALLOWLIST)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: refused to load global 'rlbench.")
    assert message.endswith("a features pickle may only hold numpy arrays and builtin containers")


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", None])
def test_features_allowlist_loads_the_published_layout(tmp_path, protocol, numpy_module):
    """X-ICM's dict of paths and float32 arrays, as numpy 1 (X-ICM's environment, via
    `dump_pickle`) or numpy 2 writes it, at the protocols either may use."""
    features = xicm_features(np.random.default_rng(protocol), "data/train", ("a", "b"), 3)
    if numpy_module is None:
        data = pickle.dumps(features, protocol=protocol)
    else:
        data = dump_pickle(features, numpy_module=numpy_module)
        assert numpy_module.encode() in data
    loaded = load_pickle(tmp_path / "f.pkl", data=data, allowlist=XICM_FEATURES_ALLOWLIST)
    assert loaded["all_demo_paths"] == features["all_demo_paths"]
    for key in ("all_input_image_feats", "all_output_image_feats", "all_prompt_feats"):
        assert loaded[key].dtype == np.float32 and np.array_equal(loaded[key], features[key])


def test_rlbench_allowlist_reads_protocol_5_arrays(tmp_path):
    """Both allowlists share the numpy names, `_frombuffer` (protocol 5) included."""
    value = {"gripper_pose": np.arange(7.0), "mask": np.ones((2, 3), dtype=np.uint8)}
    loaded = load_pickle(tmp_path / "v.pkl", data=pickle.dumps(value, protocol=5))
    assert b"_frombuffer" in pickle.dumps(value, protocol=5)
    for key, array in value.items():
        assert loaded[key].dtype == array.dtype and np.array_equal(loaded[key], array)


class _TouchesMarker:
    """Unpickling this would run a shell command that creates `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _read_rlbench(path):
    return load_pickle(path)


@pytest.mark.parametrize(
    ("reader", "error"),
    [(_read_rlbench, PickleRefusedError), (load_xicm_pickle, BankError)],
    ids=["rlbench-episode", "xicm-features"],
)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_both_readers_refuse_os_system_naming_the_file(tmp_path, reader, error, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"all_demo_paths": [_TouchesMarker(marker)]}, protocol=protocol))
    with pytest.raises(error) as excinfo:
        reader(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: refused to load global '")
    assert ".system'" in message and "\n" not in message  # one line, naming the global
    assert not marker.exists()  # the command never ran


def test_an_allowlist_is_the_only_way_in(tmp_path):
    """The unpickler resolves exactly what its allowlist maps, to the mapped object, and
    an allowlist cannot be widened after it is made."""
    with pytest.raises(TypeError):
        RLBENCH_ALLOWLIST.globals[("os", "system")] = os.system  # type: ignore[index]
    data = pickle.dumps([np.float64(1.5), "x"], protocol=4)
    plain = PickleAllowlist("plain values", {}, refusal="only plain values here")
    with pytest.raises(PickleRefusedError, match=r"v\.pkl: .*numpy.*; only plain values here$"):
        load_pickle(tmp_path / "v.pkl", data=data, allowlist=plain)
    assert load_pickle(tmp_path / "v.pkl", data=pickle.dumps([1, "x"], 4), allowlist=plain) == [
        1,
        "x",
    ]
    dtype_entry = RLBENCH_ALLOWLIST.resolve("numpy", "dtype")
    stand_in = PickleAllowlist("renamed", {("my", "dtype"): dtype_entry}, refusal="-")
    assert stand_in.resolve("my", "dtype") is dtype_entry
    assert stand_in.resolve("os", "system") is None
    with pytest.raises(TypeError, match="PickleGlobal"):  # a raw callable is never an entry
        PickleAllowlist("raw", {("numpy", "dtype"): str}, refusal="-")
