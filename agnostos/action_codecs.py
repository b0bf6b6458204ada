"""Action codecs: RLBench 9-dim actions <-> integer codes, in one place.

An RLBench keyframe action is 9 numbers, `[x, y, z, qx, qy, qz, qw, gripper_open,
ignore_collisions]` (world frame, quaternion xyzw). Models see it through a codec:

* `XICMActionCodec`: X-ICM's 7-integer code `[vx, vy, vz, rx, ry, rz, g]` with exact parity
  to the published encoder/decoder (RoboPrompt `utils.py`, X-ICM `crosstask_icl_agent.py`;
  see `xicm_method.md` section 3). Positions are 1 cm voxels over the scene bounds
  [-0.3, -0.5, 0.6]-[0.7, 0.5, 1.6]; the encoder keeps PerAct's `1e-12` guards, floors, clamps
  at 99 and has no lower clamp, which is why (-0.4, 0, 0.95) gives (-10, 49, 34) and not
  (-11, 50, 35). Rotations are extrinsic XYZ Euler angles in degrees, + 180, in 5 degree bins
  (rounded half to even as `np.around` does, 72 wrapped to 0), after normalising the
  quaternion and flipping its sign when w < 0. Decoding returns bin centres.
* `TokenBinCodec`: OpenVLA-style tokens, N uniform bins per dimension over ranges normalised
  with statistics of the training actions (`ActionStats`), for VLAs that emit one token per
  action dimension.

The Euler <-> quaternion conversions are scipy's `Rotation` (`from_quat(xyzw).as_euler('xyz',
degrees=True)` and `from_euler('xyz', ..., degrees=True).as_quat()`), the very calls X-ICM
makes. A numpy re-derivation agrees to ~1e-14 degrees, but at exact half-bin ties (an angle
of 2.5 degrees, say) that last bit decides the rounding, so only the same computation gives
the same bins. scipy's `from_euler` does not canonicalise the sign, so the X-ICM "home"
action decodes to (0, 0.991, 0, 0.131), not its negative.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.spatial.transform import Rotation

ACTION_DIM = 9
ACTION_NAMES: tuple[str, ...] = (
    "x", "y", "z", "qx", "qy", "qz", "qw", "gripper_open", "ignore_collisions",
)  # fmt: skip
SCENE_BOUNDS: tuple[float, ...] = (-0.3, -0.5, 0.6, 0.7, 0.5, 1.6)
VOXEL_SIZE = 100
ROTATION_RESOLUTION = 5
XICM_HOME_CODE: tuple[int, ...] = (57, 49, 87, 0, 39, 0, 1)
_GUARD = 1e-12  # PerAct's MIN_DENOMINATOR, kept for parity of bin edges


# -- rotations (scipy's Rotation, as X-ICM) --------------------------------------------


def normalise_quaternions(quaternions: np.ndarray) -> np.ndarray:
    """Unit quaternions (..., 4); a zero quaternion is an error, not a NaN.

    The same division by `np.linalg.norm(q, axis=-1, keepdims=True)` as X-ICM's
    `normalize_quaternion`, so the normalised values match to the bit.
    """
    quats = np.asarray(quaternions, dtype=np.float64)
    norms = np.linalg.norm(quats, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("quaternion with zero or non-finite norm")
    return quats / norms


def _flat(values: np.ndarray, width: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """`values` as (N, width) rows for scipy, and the leading shape to restore."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape[-1:] != (width,):
        raise ValueError(f"expected {width} values in the last axis, got shape {array.shape}")
    return array.reshape(-1, width), array.shape[:-1]


def euler_xyz_to_quaternion(angles: np.ndarray, degrees: bool = True) -> np.ndarray:
    """Extrinsic XYZ Euler angles (..., 3) -> xyzw quaternions: scipy `from_euler('xyz')`.

    The sign is left as scipy's composition gives it (no canonicalisation), as X-ICM's
    `discrete_euler_to_quaternion` returns it.
    """
    rows, leading = _flat(angles, 3)
    if not len(rows):  # older scipy refuses empty stacks
        return np.zeros((*leading, 4))
    quats = Rotation.from_euler("xyz", rows, degrees=degrees).as_quat()
    return quats.reshape(*leading, 4)


def quaternion_to_euler_xyz(quaternions: np.ndarray, degrees: bool = True) -> np.ndarray:
    """xyzw quaternions (..., 4) -> extrinsic XYZ Euler angles: scipy `as_euler('xyz')`.

    Angles 1 and 3 lie in [-180, 180], the middle one in [-90, 90]; at gimbal lock scipy
    sets the third angle to 0 (and warns, which is silenced here: the bins stay defined).
    """
    rows, leading = _flat(quaternions, 4)
    if not len(rows):
        return np.zeros((*leading, 3))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gimbal lock detected", category=UserWarning)
        angles = Rotation.from_quat(rows).as_euler("xyz", degrees=degrees)
    return angles.reshape(*leading, 3)


def quaternion_to_matrix(quaternions: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of xyzw quaternions (used to compare rotations)."""
    rows, leading = _flat(normalise_quaternions(quaternions), 4)
    if not len(rows):
        return np.zeros((*leading, 3, 3))
    return Rotation.from_quat(rows).as_matrix().reshape(*leading, 3, 3)


def canonical_quaternions(quaternions: np.ndarray) -> np.ndarray:
    """Normalised quaternions with w >= 0 (X-ICM's sign convention before encoding)."""
    quats = normalise_quaternions(quaternions)
    return np.where(quats[..., 3:] < 0, -quats, quats)


# -- the codec interface ----------------------------------------------------------------


def _as_actions(actions: np.ndarray | Sequence[float]) -> np.ndarray:
    array = np.asarray(actions, dtype=np.float64)
    if array.shape[-1:] != (ACTION_DIM,):
        raise ValueError(
            f"actions must have {ACTION_DIM} values in the last axis, got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("actions contain NaN or infinite values")
    return array


class ActionCodec(ABC):
    """9-dim RLBench actions <-> integer codes of `code_size` values per action.

    `encode` takes (..., 9) actions and returns (..., code_size) int64 codes; `decode` returns
    (..., 9) float64 actions at the bin centres; `centres` returns the bin centres in the
    codec's own coordinates (what a model regressing the code would aim for).
    """

    name: str

    @property
    @abstractmethod
    def code_size(self) -> int: ...

    @abstractmethod
    def encode(self, actions: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def centres(self, codes: np.ndarray) -> np.ndarray: ...

    def _as_codes(self, codes: np.ndarray | Sequence[int]) -> np.ndarray:
        array = np.asarray(codes)
        if array.shape[-1:] != (self.code_size,):
            raise ValueError(
                f"{self.name} codes must have {self.code_size} values in the last axis, "
                f"got shape {array.shape}"
            )
        if array.dtype.kind not in "iu":
            rounded = np.rint(array)
            if not np.array_equal(rounded, array):
                raise ValueError(f"{self.name} codes must be integers, got {array.tolist()}")
        return array.astype(np.int64)


# -- X-ICM ------------------------------------------------------------------------------


@dataclass(frozen=True)
class XICMActionCodec(ActionCodec):
    """X-ICM's `[vx, vy, vz, rx, ry, rz, g]` code (see the module docstring).

    parity=True reproduces the published code bit for bit: no lower clamp on positions and
    no range check when decoding. parity=False clamps positions to 0..voxel_size-1 and
    rejects codes outside the valid ranges, naming the value at fault.
    `ignore_collisions` is not part of the code; decoding fills in the constant X-ICM uses.
    """

    scene_bounds: tuple[float, ...] = SCENE_BOUNDS
    voxel_size: int = VOXEL_SIZE
    rotation_resolution: int = ROTATION_RESOLUTION
    parity: bool = True
    ignore_collisions: float = 1.0
    name: str = "xicm"

    def __post_init__(self) -> None:
        if len(self.scene_bounds) != 6:
            raise ValueError(f"scene_bounds needs 6 values (mins, maxs), got {self.scene_bounds}")
        if 360 % self.rotation_resolution:
            raise ValueError(f"rotation_resolution {self.rotation_resolution} must divide 360")
        if self.voxel_size < 1:
            raise ValueError(f"voxel_size must be positive, got {self.voxel_size}")

    @property
    def code_size(self) -> int:
        return 7

    @property
    def rotation_bins(self) -> int:
        return 360 // self.rotation_resolution

    @property
    def _mins(self) -> np.ndarray:
        return np.asarray(self.scene_bounds[:3], dtype=np.float64)

    @property
    def _ranges(self) -> np.ndarray:
        return np.asarray(self.scene_bounds[3:], dtype=np.float64) - self._mins

    def encode_position(self, points: np.ndarray) -> np.ndarray:
        """World xyz (..., 3) -> voxel indices, exactly as PerAct's `point_to_voxel_index`."""
        points = np.asarray(points, dtype=np.float64)
        res = self._ranges / (np.full(3, float(self.voxel_size)) + _GUARD)
        indices = np.floor((points - self._mins) / (res + _GUARD)).astype(np.int64)
        indices = np.minimum(indices, self.voxel_size - 1)
        return indices if self.parity else np.maximum(indices, 0)

    def decode_position(self, indices: np.ndarray) -> np.ndarray:
        """Voxel indices -> the voxel centres (X-ICM: `min + res * idx + res / 2`)."""
        res = self._ranges / self.voxel_size
        return self._mins + res * np.asarray(indices, dtype=np.float64) + res / 2

    def encode_rotation(self, quaternions: np.ndarray) -> np.ndarray:
        """xyzw quaternions -> Euler bins 0..rotation_bins-1, as X-ICM's
        `quaternion_to_discrete_euler`: normalise, negate when w < 0, scipy `as_euler('xyz')`
        + 180, divide by the resolution, `np.around` (half to even), wrap 72 to 0."""
        euler = quaternion_to_euler_xyz(canonical_quaternions(quaternions)) + 180
        bins = np.around(euler / self.rotation_resolution).astype(np.int64)
        return np.where(bins == self.rotation_bins, 0, bins)

    def rotation_centres(self, bins: np.ndarray) -> np.ndarray:
        """Euler bins -> angles in degrees (`bin * resolution - 180`)."""
        return np.asarray(bins, dtype=np.float64) * self.rotation_resolution - 180

    def decode_rotation(self, bins: np.ndarray) -> np.ndarray:
        """Euler bins -> xyzw quaternions, as X-ICM's `discrete_euler_to_quaternion`
        (scipy `from_euler('xyz', bin * resolution - 180, degrees=True).as_quat()`)."""
        return euler_xyz_to_quaternion(self.rotation_centres(bins))

    def encode(self, actions: np.ndarray) -> np.ndarray:
        actions = _as_actions(actions)
        gripper = actions[..., 7:8].astype(np.int64)  # X-ICM: int(obs.gripper_open)
        return np.concatenate(
            [self.encode_position(actions[..., :3]), self.encode_rotation(actions[..., 3:7]),
             gripper],
            axis=-1,
        )  # fmt: skip

    def check(self, codes: np.ndarray) -> np.ndarray:
        """Codes as int64, refusing out-of-range values (the published decoder never checks)."""
        codes = self._as_codes(codes)
        limits = [(0, self.voxel_size - 1)] * 3 + [(0, self.rotation_bins - 1)] * 3 + [(0, 1)]
        for position, (low, high) in enumerate(limits):
            values = codes[..., position]
            bad = (values < low) | (values > high)
            if np.any(bad):
                value = int(values[bad].reshape(-1)[0])
                raise ValueError(
                    f"X-ICM code value {value} at position {position} "
                    f"({('vx', 'vy', 'vz', 'rx', 'ry', 'rz', 'g')[position]}) is outside "
                    f"{low}..{high}"
                )
        return codes

    def centres(self, codes: np.ndarray) -> np.ndarray:
        """(..., 7) -> voxel centre xyz (m), Euler angles (degrees), gripper."""
        codes = self._as_codes(codes) if self.parity else self.check(codes)
        return np.concatenate(
            [self.decode_position(codes[..., :3]), self.rotation_centres(codes[..., 3:6]),
             codes[..., 6:7].astype(np.float64)],
            axis=-1,
        )  # fmt: skip

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self._as_codes(codes) if self.parity else self.check(codes)
        ignore = np.full((*codes.shape[:-1], 1), self.ignore_collisions)
        return np.concatenate(
            [self.decode_position(codes[..., :3]), self.decode_rotation(codes[..., 3:6]),
             codes[..., 6:7].astype(np.float64), ignore],
            axis=-1,
        )  # fmt: skip

    @staticmethod
    def to_text(codes: np.ndarray) -> str:
        """`[[57, 49, 87, 0, 39, 0, 1], ...]` with plain ints (never `np.int64(57)`)."""
        return str(np.asarray(codes, dtype=np.int64).reshape(-1, 7).tolist())


# -- token bins -------------------------------------------------------------------------


def action_vectors(actions: np.ndarray) -> np.ndarray:
    """9-dim actions with the quaternion normalised and its sign fixed to w >= 0.

    q and -q are the same rotation; binning them separately would waste tokens and make
    the statistics bimodal.
    """
    actions = _as_actions(actions).copy()
    actions[..., 3:7] = canonical_quaternions(actions[..., 3:7])
    return actions


@dataclass(frozen=True)
class ActionStats:
    """Per-dimension statistics of training actions (after `action_vectors`)."""

    count: int
    minimum: tuple[float, ...]
    maximum: tuple[float, ...]
    q01: tuple[float, ...]
    q99: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    names: tuple[str, ...] = ACTION_NAMES

    @classmethod
    def compute(cls, actions: np.ndarray) -> ActionStats:
        vectors = action_vectors(actions).reshape(-1, ACTION_DIM)
        if len(vectors) == 0:
            raise ValueError("cannot compute action statistics from zero actions")

        def values(array: np.ndarray) -> tuple[float, ...]:
            return tuple(float(value) for value in array)

        return cls(
            count=len(vectors),
            minimum=values(vectors.min(axis=0)),
            maximum=values(vectors.max(axis=0)),
            q01=values(np.quantile(vectors, 0.01, axis=0)),
            q99=values(np.quantile(vectors, 0.99, axis=0)),
            mean=values(vectors.mean(axis=0)),
            std=values(vectors.std(axis=0)),
        )

    def bounds(self, kind: Literal["q01_q99", "minmax"]) -> tuple[np.ndarray, np.ndarray]:
        if kind == "q01_q99":
            return np.asarray(self.q01), np.asarray(self.q99)
        if kind == "minmax":
            return np.asarray(self.minimum), np.asarray(self.maximum)
        raise ValueError(f"unknown bounds {kind!r}; choose 'q01_q99' or 'minmax'")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ActionStats:
        fields = {
            name: tuple(data[name]) if isinstance(data[name], list) else data[name]
            for name in cls.__dataclass_fields__
            if name in data
        }
        stats = cls(**fields)
        for name in ("minimum", "maximum", "q01", "q99", "mean", "std"):
            if len(getattr(stats, name)) != ACTION_DIM:
                raise ValueError(f"action stats field '{name}' needs {ACTION_DIM} values")
        return stats

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActionStats:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except KeyError as err:
            raise ValueError(f"{path}: invalid action statistics (missing {err.args[0]})") from err
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid action statistics ({err})") from err


@dataclass(frozen=True)
class TokenBinCodec(ActionCodec):
    """N uniform bins per action dimension over [-1, 1] after min/max normalisation.

    Each of the 9 dimensions (xyz, canonical quaternion, gripper, ignore_collisions) is
    mapped to [-1, 1] with the chosen bounds of `stats` (1st/99th percentiles, as OpenVLA,
    or min/max), clipped, and split into `bins` equal bins. Decoding returns bin centres
    (a normalised quaternion), so a value inside the bounds comes back within half a bin.
    A dimension whose bounds coincide (a constant in the data) decodes to that constant.
    """

    stats: ActionStats
    bins: int = 256
    bounds: Literal["q01_q99", "minmax"] = "q01_q99"
    name: str = "token_bins"

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"bins must be at least 2, got {self.bins}")
        self.stats.bounds(self.bounds)  # validates the bounds name

    @property
    def code_size(self) -> int:
        return ACTION_DIM

    def _low_high(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        low, high = self.stats.bounds(self.bounds)
        span = high - low
        return low, high, np.where(span > 0, span, 1.0)

    def bin_width(self) -> np.ndarray:
        """The width of one bin in action units, per dimension (0 for constant ones)."""
        low, high, _ = self._low_high()
        return (high - low) / self.bins

    def normalise(self, actions: np.ndarray) -> np.ndarray:
        low, _, span = self._low_high()
        return np.clip(2 * (action_vectors(actions) - low) / span - 1, -1.0, 1.0)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        scaled = (self.normalise(actions) + 1) / 2 * self.bins
        return np.minimum(np.floor(scaled).astype(np.int64), self.bins - 1)

    def centres(self, codes: np.ndarray) -> np.ndarray:
        codes = self._as_codes(codes)
        if np.any((codes < 0) | (codes >= self.bins)):
            value = int(codes[(codes < 0) | (codes >= self.bins)].reshape(-1)[0])
            raise ValueError(f"token code {value} is outside 0..{self.bins - 1}")
        return (codes + 0.5) / self.bins * 2 - 1

    def decode(self, codes: np.ndarray) -> np.ndarray:
        low, high, _ = self._low_high()
        actions = low + (self.centres(codes) + 1) / 2 * (high - low)
        actions[..., 3:7] = canonical_quaternions(actions[..., 3:7])
        return actions
