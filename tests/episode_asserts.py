"""Exact comparison of two Episodes, field by field and byte by byte."""

from __future__ import annotations

import numpy as np

from agnostos.shards.episode import Episode


def assert_episodes_equal(actual: Episode, expected: Episode) -> None:
    for name in (
        "task", "variation", "episode", "descriptions", "num_frames", "keyframes",
        "image_cameras", "modalities", "source", "variation_folder", "key",
    ):  # fmt: skip
        assert getattr(actual, name) == getattr(expected, name), name
    actual_arrays, expected_arrays = actual.low_dim.arrays(), expected.low_dim.arrays()
    assert sorted(actual_arrays) == sorted(expected_arrays)
    for name, array in expected_arrays.items():
        assert actual_arrays[name].dtype == array.dtype, name
        np.testing.assert_array_equal(actual_arrays[name], array, err_msg=name)
    assert sorted(actual.cameras) == sorted(expected.cameras)
    for camera, params in expected.cameras.items():
        for part in ("intrinsics", "extrinsics", "near", "far"):
            np.testing.assert_array_equal(
                getattr(actual.cameras[camera], part), getattr(params, part), err_msg=camera
            )
    assert {c: dict(m) for c, m in actual.mask_names.items()} == {
        c: dict(m) for c, m in expected.mask_names.items()
    }
    if expected.random_state is None:
        assert actual.random_state is None
    else:
        for left, right in zip(
            actual.random_state.as_tuple(), expected.random_state.as_tuple(), strict=True
        ):
            np.testing.assert_array_equal(left, right)
    for camera in expected.image_cameras:
        for modality in expected.modalities:
            for index in range(expected.num_frames):
                assert actual.png(camera, modality, index) == expected.png(
                    camera, modality, index
                ), f"{camera}_{modality}/{index}.png"
