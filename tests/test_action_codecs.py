"""Action codecs: X-ICM parity values, rotation maths, round trips, token bins."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from agnostos.action_codecs import (
    XICM_HOME_CODE,
    ActionStats,
    TokenBinCodec,
    XICMActionCodec,
    canonical_quaternions,
    euler_xyz_to_quaternion,
    quaternion_to_euler_xyz,
    quaternion_to_matrix,
)

CODEC = XICMActionCodec()
unit = st.floats(-1.0, 1.0, allow_nan=False)
quaternions = st.tuples(unit, unit, unit, unit).filter(lambda q: np.linalg.norm(q) > 0.1)


def _rx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _extrinsic_xyz(degrees):
    """Rotation about fixed x, then fixed y, then fixed z (an independent reference)."""
    a, b, c = np.deg2rad(degrees)
    return _rz(c) @ _ry(b) @ _rx(a)


def _angle_between(q1, q2) -> float:
    """Geodesic angle in degrees between two rotations given as quaternions."""
    a, b = canonical_quaternions(q1), canonical_quaternions(q2)
    chord = min(np.linalg.norm(a - b), np.linalg.norm(a + b))  # well conditioned near 0
    return float(np.degrees(4 * np.arcsin(min(1.0, chord / 2))))


# -- X-ICM parity ------------------------------------------------------------------------


def test_home_action_decodes_to_the_published_pose():
    action = CODEC.decode(list(XICM_HOME_CODE))
    np.testing.assert_allclose(action[:3], [0.275, -0.005, 1.475], atol=1e-12)
    np.testing.assert_allclose(action[3:7], [0.0, 0.991444861, 0.0, 0.130526192], atol=1e-8)
    assert action[7] == 1.0 and action[8] == 1.0  # gripper open, ignore_collisions = 1
    np.testing.assert_allclose(CODEC.centres(list(XICM_HOME_CODE))[3:6], [-180, 15, -180])
    assert CODEC.encode(action).tolist() == list(XICM_HOME_CODE)
    assert XICMActionCodec.to_text(np.array([XICM_HOME_CODE] * 2)) == (
        "[[57, 49, 87, 0, 39, 0, 1], [57, 49, 87, 0, 39, 0, 1]]"
    )


def test_position_encoding_keeps_the_published_bin_edges():
    # PerAct's 1e-12 guards put exact edges in the lower cell; plain floor would say (-11, 50, 35).
    assert CODEC.encode_position([-0.4, 0.0, 0.95]).tolist() == [-10, 49, 34]
    assert CODEC.encode_position([5.0, 5.0, 5.0]).tolist() == [99, 99, 99]  # upper clamp
    assert CODEC.encode_position([-0.3, -0.5, 0.6]).tolist() == [0, 0, 0]
    clamped = XICMActionCodec(parity=False)
    assert clamped.encode_position([-0.4, 0.0, 0.95]).tolist() == [0, 49, 34]


def test_rotation_encoding_flips_negative_w_and_wraps_72_to_0():
    q = np.array([0.0, 0.991444861, 0.0, 0.130526192])
    assert CODEC.encode_rotation(q).tolist() == CODEC.encode_rotation(-q).tolist() == [0, 39, 0]
    assert CODEC.encode_rotation(3.7 * q).tolist() == [0, 39, 0]  # normalised first
    # +178.6 degrees about x: 358.6 / 5 rounds to 72, which wraps to bin 0 (same as -180).
    assert CODEC.encode_rotation(euler_xyz_to_quaternion([178.6, 0.0, 0.0]))[0] == 0
    # np.around rounds half to even: 2.5 degrees -> 182.5 / 5 = 36.5 -> 36.
    assert CODEC.encode_rotation(euler_xyz_to_quaternion([0.0, 0.0, 2.5]))[2] == 36


def _xicm_discrete_euler(quaternion) -> list[int]:
    """X-ICM's encoder written out, one quaternion at a time: `normalize_quaternion`, negate
    when w < 0, `quaternion_to_discrete_euler` (scipy, + 180, / 5, np.around, 72 -> 0)."""
    quat = np.array(quaternion) / np.linalg.norm(quaternion, axis=-1, keepdims=True)
    if quat[-1] < 0:
        quat = -quat
    euler = Rotation.from_quat(quat).as_euler("xyz", degrees=True) + 180
    disc = np.around(euler / 5).astype(int)
    disc[disc == 72] = 0
    return disc.tolist()


def _xicm_quaternion(bins) -> np.ndarray:
    """X-ICM's `discrete_euler_to_quaternion`, one code at a time."""
    return Rotation.from_euler("xyz", np.array(bins) * 5 - 180, degrees=True).as_quat()


# Half-bin ties: quaternions (scipy `from_euler` of the angles, stored to the bit) whose Euler
# angle is nominally k * 5 + 2.5 degrees. scipy's `as_euler` and the numpy port this codec
# used before land on opposite sides of the tie, so `np.around` picks neighbouring bins.
HALF_BIN_TIES = [
    # (Euler angles, xyzw quaternion, X-ICM's bins, the old numpy port's bins)
    ((-82.5, 0, 0), ("-0x1.5195c65137f0cp-1", "0x0.0p+0", "0x0.0p+0", "0x1.80f125b1e8028p-1"),
     [20, 36, 36], [19, 36, 36]),
    ((0, 0, -82.5), ("0x0.0p+0", "0x0.0p+0", "-0x1.5195c65137f0cp-1", "0x1.80f125b1e8028p-1"),
     [36, 36, 20], [36, 36, 19]),
    ((12.5, -17.5, 0), ("0x1.b8ba9920bb99cp-4", "-0x1.35b26ba203052p-3",
                        "0x1.0f56b29186e1ep-6", "0x1.f7088a0918286p-1"),
     [38, 32, 36], [38, 33, 36]),
    ((-45, 0, -97.5), ("-0x1.02605cdbcb62dp-2", "0x1.269f30bcdf351p-2",
                       "-0x1.63a3d835a8e94p-1", "0x1.37e34f0cad74cp-1"),
     [27, 36, 16], [27, 36, 17]),
    # w < 0: X-ICM negates the quaternion before converting it.
    ((-177.5, 60, 60), ("-0x1.82b36fbc07f1ep-1", "-0x1.b1a06cbb352a8p-2",
                        "0x1.c4f8e9ce6192fp-2", "-0x1.de5ed8b971f2cp-3"),
     [1, 48, 48], [0, 48, 48]),
]  # fmt: skip


@pytest.mark.parametrize(("angles", "quaternion", "bins", "old_bins"), HALF_BIN_TIES)
def test_half_bin_ties_round_as_x_icm_does(angles, quaternion, bins, old_bins):
    q = np.array([float.fromhex(value) for value in quaternion])
    np.testing.assert_allclose(q, Rotation.from_euler("xyz", angles, degrees=True).as_quat())
    assert CODEC.encode_rotation(q).tolist() == _xicm_discrete_euler(q) == bins
    assert bins != old_bins


def test_rotation_codec_is_vectorised_and_equals_x_icm_row_by_row():
    rng = np.random.default_rng(7)
    halves = np.arange(72) * 5 + 2.5 - 180
    grid = np.stack(np.meshgrid(halves[::5], halves[18:54:4], halves[::7]), -1).reshape(-1, 3)
    ties = np.array([[float.fromhex(v) for v in row[1]] for row in HALF_BIN_TIES])
    quats = np.concatenate(
        [ties, Rotation.from_euler("xyz", grid, degrees=True).as_quat(), rng.normal(size=(300, 4))]
    )
    expected = [_xicm_discrete_euler(q) for q in quats]
    assert CODEC.encode_rotation(quats).tolist() == expected
    assert (
        CODEC.encode_rotation(quats[:300].reshape(3, 100, 4)).reshape(300, 3).tolist()
        == (expected[:300])
    )
    codes = rng.integers(0, 72, size=(200, 3))
    decoded = CODEC.decode_rotation(codes)
    assert np.array_equal(decoded, np.stack([_xicm_quaternion(code) for code in codes]))
    assert CODEC.decode_rotation(codes[:0]).shape == (0, 4)
    assert CODEC.encode_rotation(quats[:0]).shape == (0, 3)


def test_gripper_bit_and_strict_mode_errors():
    action = CODEC.decode(list(XICM_HOME_CODE))
    action[7] = 0.0
    assert CODEC.encode(action)[6] == 0
    strict = XICMActionCodec(parity=False)
    with pytest.raises(ValueError, match=r"value 100 at position 0 \(vx\)"):
        strict.decode([100, 49, 87, 0, 39, 0, 1])
    with pytest.raises(ValueError, match=r"value 72 at position 4 \(ry\)"):
        strict.decode([57, 49, 87, 0, 72, 0, 1])
    with pytest.raises(ValueError, match="7 values"):
        CODEC.decode([57, 49, 87])
    with pytest.raises(ValueError, match="integers"):
        CODEC.decode([57.5, 49, 87, 0, 39, 0, 1])
    # Parity mode decodes out-of-range indices like the published agent (no checks).
    assert CODEC.decode([100, 49, 87, 0, 39, 0, 1])[0] == pytest.approx(0.705)


# -- rotation maths ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.floats(-180, 180), st.floats(-89.5, 89.5), st.floats(-180, 180))
def test_euler_to_quaternion_matches_the_matrix_definition(a, b, c):
    q = euler_xyz_to_quaternion([a, b, c])
    np.testing.assert_allclose(quaternion_to_matrix(q), _extrinsic_xyz([a, b, c]), atol=1e-9)
    back = quaternion_to_euler_xyz(q)
    np.testing.assert_allclose(quaternion_to_matrix(euler_xyz_to_quaternion(back)),
                               _extrinsic_xyz([a, b, c]), atol=1e-9)  # fmt: skip
    assert -90 - 1e-9 <= back[1] <= 90 + 1e-9


@settings(max_examples=200, deadline=None)
@given(quaternions)
def test_quaternion_to_euler_gives_the_same_rotation(q):
    angles = quaternion_to_euler_xyz(np.array(q))
    assert np.all(np.abs(angles) <= 180 + 1e-9)
    np.testing.assert_allclose(_extrinsic_xyz(angles), quaternion_to_matrix(np.array(q)),
                               atol=1e-7)  # fmt: skip


def test_gimbal_lock_sets_the_third_angle_to_zero():
    q = euler_xyz_to_quaternion([30.0, 90.0, 0.0])
    angles = quaternion_to_euler_xyz(q)
    assert angles[2] == 0.0 and angles[1] == pytest.approx(90.0)
    np.testing.assert_allclose(_extrinsic_xyz(angles), quaternion_to_matrix(q), atol=1e-7)


# -- round trips -------------------------------------------------------------------------


codes = st.tuples(
    st.integers(0, 99), st.integers(0, 99), st.integers(0, 99),
    st.integers(0, 71), st.integers(19, 53), st.integers(0, 71), st.integers(0, 1),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(codes)
def test_decode_then_encode_returns_the_code(code):
    # ry in 19..53 is pitch strictly inside (-90, 90): Euler angles are unique there.
    assert CODEC.encode(CODEC.decode(list(code))).tolist() == list(code)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 71), st.integers(0, 71), st.integers(0, 71))
def test_any_rotation_code_decodes_to_a_rotation_that_reencodes_equivalently(rx, ry, rz):
    q = CODEC.decode_rotation([rx, ry, rz])
    again = CODEC.decode_rotation(CODEC.encode_rotation(q))
    assert _angle_between(q, again) < 1e-6 or ry in (18, 54)  # gimbal lock: not unique


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(st.floats(-0.3, 0.6999), st.floats(-0.5, 0.4999), st.floats(0.6, 1.5999)),
    st.floats(-180, 180), st.floats(-80, 80), st.floats(-180, 180), st.booleans(),
)  # fmt: skip
def test_encode_then_decode_is_within_half_a_bin(xyz, a, b, c, gripper):
    action = np.concatenate([xyz, euler_xyz_to_quaternion([a, b, c]), [float(gripper), 1.0]])
    decoded = CODEC.decode(CODEC.encode(action))
    assert np.all(np.abs(decoded[:3] - action[:3]) <= 0.005 + 1e-9)
    before = quaternion_to_euler_xyz(canonical_quaternions(action[3:7]))
    after = quaternion_to_euler_xyz(decoded[3:7])
    difference = (after - before + 180) % 360 - 180
    assume(abs(before[1]) < 87.5)  # a pitch bin touching +-90 maps to another Euler triple
    assert np.all(np.abs(difference) <= 2.5 + 1e-6), (before, after)
    assert decoded[7] == float(gripper)


# -- token bins --------------------------------------------------------------------------


def _actions(rng: np.random.Generator, count: int) -> np.ndarray:
    xyz = rng.uniform([-0.2, -0.4, 0.7], [0.6, 0.4, 1.5], size=(count, 3))
    quats = canonical_quaternions(rng.normal(size=(count, 4)))
    gripper = rng.integers(0, 2, size=(count, 1)).astype(float)
    return np.concatenate([xyz, quats, gripper, np.ones((count, 1))], axis=1)


def test_action_stats_and_json_round_trip(tmp_path):
    actions = _actions(np.random.default_rng(0), 500)
    stats = ActionStats.compute(actions)
    assert stats.count == 500
    np.testing.assert_allclose(stats.minimum, actions.min(axis=0))
    np.testing.assert_allclose(stats.q99, np.quantile(actions, 0.99, axis=0))
    assert ActionStats.load(stats.save(tmp_path / "stats.json")) == stats
    data = json.loads((tmp_path / "stats.json").read_text())
    data["q01"] = data["q01"][:3]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json.*'q01' needs 9"):
        ActionStats.load(tmp_path / "bad.json")


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**31 - 1), st.sampled_from([16, 256]), st.sampled_from(["minmax", "q01_q99"])
)
def test_token_bins_round_trip_within_half_a_bin(seed, bins, bounds):
    rng = np.random.default_rng(seed)
    codec = TokenBinCodec(ActionStats.compute(_actions(rng, 200)), bins, bounds)
    actions = _actions(rng, 20)
    low, high = codec.stats.bounds(bounds)
    codes = codec.encode(actions)
    assert codes.shape == (20, 9) and codes.min() >= 0 and codes.max() < bins
    decoded = codec.decode(codes)
    inside = (actions >= low) & (actions <= high)
    error = np.abs(decoded - actions)
    half = codec.bin_width() / 2
    for dim in (0, 1, 2, 7):
        assert np.all(error[inside[:, dim], dim] <= half[dim] + 1e-9)
    assert np.all(decoded[:, 8] == 1.0)  # a constant dimension decodes to the constant
    plain = [0, 1, 2, 7, 8]
    assert np.array_equal(codec.encode(decoded)[:, plain], codes[:, plain])
    # The quaternion is renormalised after decoding: a perturbation e of a unit 4-vector
    # turns the rotation by at most 2 asin(|e|).
    limit = np.degrees(2 * np.arcsin(min(1.0, np.linalg.norm(half[3:7])))) + 1e-6
    for row in np.flatnonzero(inside[:, 3:7].all(axis=1)):
        assert _angle_between(decoded[row, 3:7], actions[row, 3:7]) <= limit


def test_token_bins_clip_out_of_range_and_check_codes():
    actions = _actions(np.random.default_rng(1), 100)
    codec = TokenBinCodec(ActionStats.compute(actions), bins=8, bounds="minmax")
    far = actions[:1].copy()
    far[0, 0] = 10.0
    assert codec.encode(far)[0, 0] == 7
    far[0, 0] = -10.0
    assert codec.encode(far)[0, 0] == 0
    with pytest.raises(ValueError, match=r"token code 8 is outside 0\.\.7"):
        codec.decode(np.full(9, 8))
    with pytest.raises(ValueError, match="bins must be at least 2"):
        TokenBinCodec(codec.stats, bins=1)
    with pytest.raises(ValueError, match="unknown bounds"):
        TokenBinCodec(codec.stats, bounds="median")
