"""The LVSA frame pattern against cases worked out by hand, and its exact properties."""
from __future__ import annotations

import math

import pytest
import torch

from long_video_sparse_attention import (
    LVSAConfig,
    attended_fraction,
    keyframe_interval,
    lvsa_anchor_frames,
    lvsa_frame_mask,
    render_frame_mask,
)

DEFAULTS = LVSAConfig()


def _row(mask: torch.Tensor, frame: int) -> list[int]:
    return mask[frame].nonzero().flatten().tolist()


def test_defaults_are_the_papers():
    assert DEFAULTS == LVSAConfig(window=3, first_frames=1, reference_frames=21, sparsity_scale=1.0,
                                  keyframe_interval=None, rotate=True, expand_window=True)


@pytest.mark.parametrize("num_frames", [1, 2, 7, 20, 21])
@pytest.mark.parametrize("step", [0, 1, 5])
def test_up_to_21_frames_the_pattern_is_dense(num_frames, step):
    # budget = max(1 + 1, floor(21 * 1.0)) = 21 >= F, so kfi = 1 and every frame is an anchor
    assert keyframe_interval(num_frames, DEFAULTS) == 1
    assert lvsa_frame_mask(num_frames, step, DEFAULTS).all()


def test_41_frames_by_hand():
    # budget = 21 < 41. (a) wanted anchors = max(1, 21 - min(7, 41)) = 14; at offset 0 the
    # anchors are {0} | {0, kfi, 2 kfi, ...}, ceil(41 / kfi) frames: kfi = 3 gives 14, kfi = 4
    # gives 11, so (a) = 3. (b) m = 2*3 + 1 = 7: ceil((41 - 7) / (21 - 7)) = ceil(34 / 14) = 3.
    assert keyframe_interval(41, DEFAULTS) == 3
    anchors = list(range(0, 40, 3))  # 0, 3, ..., 39: 14 anchors; each row: 14 + min(7, 41 - 14) = 21
    assert list(lvsa_anchor_frames(41, 0, DEFAULTS)) == anchors
    mask = lvsa_frame_mask(41, 0, DEFAULTS)
    assert mask.sum(dim=1).tolist() == [21] * 41
    # frame 0: base window [max(0, min(-3, 34)), min(40, max(3, 6))] = [0, 6] holds the
    # non-anchors 1 2 4 5 (4 of 7); the left end is reached, so it grows right: 7, 8, 9 (an
    # anchor), 10 -> [0, 10]
    assert _row(mask, 0) == sorted(set(anchors) | set(range(0, 11)))
    # frame 20: base [17, 23] holds 17 19 20 22 23 (5); left 16 (+1), right 24 (anchor),
    # left 15 (anchor), right 25 (+1) -> [15, 25]
    assert _row(mask, 20) == sorted(set(anchors) | set(range(15, 26)))
    # frame 40: base [min(37, 34), 40] = [34, 40] holds 34 35 37 38 40 (5); the right end is
    # reached, so it grows left: 33 (anchor), 32, 31 -> [31, 40]
    assert _row(mask, 40) == sorted(set(anchors) | set(range(31, 41)))


def test_22_frames_take_the_closed_form_interval():
    # budget 21 < 22. (a) wanted anchors 14: ceil(22 / 1) = 22 but ceil(22 / 2) = 11, so (a) = 1
    # (dense); (b) ceil((22 - 7) / 14) = 2 wins: anchors 0, 2, ..., 20 (11), rows of 11 + 7 = 18
    assert keyframe_interval(22, DEFAULTS) == 2
    assert list(lvsa_anchor_frames(22, 0, DEFAULTS)) == list(range(0, 21, 2))
    assert lvsa_frame_mask(22, 0, DEFAULTS).sum(dim=1).tolist() == [18] * 22


def test_41_frames_step_1_by_hand():
    # offset 1: keyframes 1, 4, ..., 40 (ceil(41 / 3) = 14) and the first frame 0: 15 anchors
    anchors = [0] + list(range(1, 41, 3))
    assert list(lvsa_anchor_frames(41, 1, DEFAULTS)) == anchors
    mask = lvsa_frame_mask(41, 1, DEFAULTS)
    # frame 20: base [17, 23] holds 17 18 20 21 23 (5; 19 and 22 are anchors); left 16 (anchor),
    # right 24 (+1), left 15 (+1) -> [15, 24]
    assert _row(mask, 20) == sorted(set(anchors) | set(range(15, 25)))
    assert mask.sum(dim=1).tolist() == [15 + 7] * 41


def test_41_frames_offset_2_wraps_around():
    # offset 2: 2, 5, ..., 38 and 2 + 13 * 3 = 41 = 0 (mod 41): still ceil(41 / 3) = 14 keyframes
    assert list(lvsa_anchor_frames(41, 2, DEFAULTS)) == [0] + list(range(2, 39, 3))


def test_81_frames_by_hand():
    # budget 21. (a) wanted anchors 14: ceil(81 / 6) = 14, ceil(81 / 7) = 12, so (a) = 6.
    # (b) ceil((81 - 7) / 14) = ceil(5.29) = 6.
    assert keyframe_interval(81, DEFAULTS) == 6
    anchors = list(range(0, 79, 6))  # 0, 6, ..., 78: 14 anchors
    assert list(lvsa_anchor_frames(81, 0, DEFAULTS)) == anchors
    mask = lvsa_frame_mask(81, 0, DEFAULTS)
    assert mask.sum(dim=1).tolist() == [21] * 81
    assert attended_fraction(mask) == pytest.approx(21 / 81)
    # frame 0: base [0, 6] holds 1..5 (5); right 7, 8 -> [0, 8]
    assert _row(mask, 0) == sorted(set(anchors) | set(range(0, 9)))
    # frame 40: base [37, 43] holds 37 38 39 40 41 43 (6; 42 is an anchor); left 36 (anchor),
    # right 44 (+1) -> [36, 44]
    assert _row(mask, 40) == sorted(set(anchors) | set(range(36, 45)))
    # frame 80: base [74, 80] holds 74 75 76 77 79 80 (6); left 73 -> [73, 80]
    assert _row(mask, 80) == sorted(set(anchors) | set(range(73, 81)))


def test_without_expansion_the_window_keeps_its_base_bounds():
    config = LVSAConfig(expand_window=False)
    mask = lvsa_frame_mask(41, 0, config)
    anchors = set(range(0, 40, 3))
    # the base window keeps 2W + 1 = 7 frames at the ends by shifting inwards
    assert _row(mask, 0) == sorted(anchors | set(range(0, 7)))
    assert _row(mask, 20) == sorted(anchors | set(range(17, 24)))
    assert _row(mask, 40) == sorted(anchors | set(range(34, 41)))
    assert _row(mask, 0) != _row(lvsa_frame_mask(41, 0, DEFAULTS), 0)


def test_window_zero_attends_to_the_anchors_only():
    # W = 0: wanted anchors = max(1, 21 - min(1, 41)) = 20; ceil(41 / 2) = 21 >= 20 but
    # ceil(41 / 3) = 14, so (a) = 2; (b) m = 1: ceil(40 / 20) = 2. Anchors: the even frames.
    config = LVSAConfig(window=0)
    assert keyframe_interval(41, config) == 2
    mask = lvsa_frame_mask(41, 0, config)
    evens = torch.zeros(41, dtype=torch.bool)
    evens[::2] = True
    assert torch.equal(mask, evens.expand(41, 41))


@pytest.mark.parametrize("num_frames", [22, 41, 81, 121])
def test_rotation_makes_every_frame_an_anchor_within_kfi_steps(num_frames):
    interval = keyframe_interval(num_frames, DEFAULTS)
    assert interval > 1
    anchors = set()
    for step in range(interval):
        columns_all_true = lvsa_frame_mask(num_frames, step, DEFAULTS).all(dim=0).nonzero().flatten().tolist()
        assert set(lvsa_anchor_frames(num_frames, step, DEFAULTS)) <= set(columns_all_true)
        anchors |= set(lvsa_anchor_frames(num_frames, step, DEFAULTS))
    assert anchors == set(range(num_frames))


@pytest.mark.parametrize("num_frames", [41, 81])
def test_the_pattern_repeats_every_kfi_steps(num_frames):
    interval = keyframe_interval(num_frames, DEFAULTS)
    for step in range(interval):
        assert torch.equal(lvsa_frame_mask(num_frames, step, DEFAULTS), lvsa_frame_mask(num_frames, step + interval))
    assert not torch.equal(lvsa_frame_mask(num_frames, 0), lvsa_frame_mask(num_frames, 1))


def test_without_rotation_the_pattern_ignores_the_step():
    config = LVSAConfig(rotate=False)
    assert all(torch.equal(lvsa_frame_mask(81, 0, config), lvsa_frame_mask(81, step, config)) for step in range(7))


def test_explicit_interval_and_first_frames():
    # kfi 10, 3 first frames, F = 30: anchors {0, 1, 2} | {0, 10, 20} at offset 0, {0, 1, 2} | {7, 17, 27} at step 7
    config = LVSAConfig(keyframe_interval=10, first_frames=3)
    assert keyframe_interval(30, config) == 10
    assert lvsa_anchor_frames(30, 0, config) == (0, 1, 2, 10, 20)
    assert lvsa_anchor_frames(30, 7, config) == (0, 1, 2, 7, 17, 27)
    assert lvsa_anchor_frames(30, 17, config) == (0, 1, 2, 7, 17, 27)


def test_sparsity_scale_moves_the_budget():
    # scale 2: budget 42 >= 41 -> dense; scale 0.5: budget 10, wanted anchors max(1, 10 - 7) = 3:
    # ceil(41 / kfi) >= 3 up to kfi 20 (ceil(41 / 21) = 2), (b) ceil(34 / 3) = 12 -> 20
    assert lvsa_frame_mask(41, 0, LVSAConfig(sparsity_scale=2.0)).all()
    assert keyframe_interval(41, LVSAConfig(sparsity_scale=0.5)) == 20
    assert lvsa_anchor_frames(41, 0, LVSAConfig(sparsity_scale=0.5)) == (0, 20, 40)


@pytest.mark.parametrize("num_frames", [3, 8, 22, 23, 30, 41, 57, 81])
@pytest.mark.parametrize("window", [0, 1, 3, 5])
@pytest.mark.parametrize("first_frames", [0, 1, 4])
def test_exact_properties_over_a_grid(num_frames, window, first_frames):
    config = LVSAConfig(window=window, first_frames=first_frames)
    for step in range(3):
        mask = lvsa_frame_mask(num_frames, step, config)
        anchors = list(lvsa_anchor_frames(num_frames, step, config))
        interval = keyframe_interval(num_frames, config)
        assert len(set(anchors) - set(range(first_frames))) <= math.ceil(num_frames / interval)
        assert mask[:, anchors].all()
        outside = mask.clone()
        outside[:, anchors] = False
        for frame in range(num_frames):
            window_frames = outside[frame].nonzero().flatten().tolist()
            assert len(window_frames) == (min(2 * window + 1, num_frames - len(anchors)) if window else 0)
            if window:
                assert mask[frame, frame]  # the window always holds its own frame
                # ... and is an interval: every non-anchor between its ends is attended
                lo, hi = min(window_frames + [frame]), max(window_frames + [frame])
                assert window_frames == [g for g in range(lo, hi + 1) if g not in anchors]


def test_frame_mask_is_a_fresh_tensor():
    first = lvsa_frame_mask(41, 0)
    first.fill_(False)
    assert lvsa_frame_mask(41, 0).sum() == 21 * 41


def test_render_marks_anchors_windows_and_counts():
    lines = render_frame_mask(41, 0).splitlines()
    assert len(lines) == 41
    assert lines[0] == " 0 AwwAwwAwwAw.A..A..A..A..A..A..A..A..A..A. 21"
    assert lines[20] == "20 A..A..A..A..A..AwwAwwAwwAw.A..A..A..A..A. 21"


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("window", -1, "window must be an int >= 0"),
        ("window", 1.5, "window must be an int >= 0"),
        ("window", True, "window must be an int >= 0"),
        ("first_frames", -1, "first_frames must be an int >= 0"),
        ("reference_frames", 0, "reference_frames must be an int >= 1"),
        ("reference_frames", 21.0, "reference_frames must be an int >= 1"),
        ("sparsity_scale", 0.0, "sparsity_scale must be a finite number > 0"),
        ("sparsity_scale", -1.0, "sparsity_scale must be a finite number > 0"),
        ("sparsity_scale", float("nan"), "sparsity_scale must be a finite number > 0"),
        ("sparsity_scale", float("inf"), "sparsity_scale must be a finite number > 0"),
        ("sparsity_scale", "1", "sparsity_scale must be a finite number > 0"),
        ("keyframe_interval", 0, r"keyframe_interval must be None \(automatic\) or an int >= 1"),
        ("keyframe_interval", 2.0, r"keyframe_interval must be None \(automatic\) or an int >= 1"),
        ("rotate", 1, "rotate must be a bool"),
        ("expand_window", "yes", "expand_window must be a bool"),
    ],
)
def test_bad_config_values_are_refused(field, value, expected):
    with pytest.raises(ValueError, match=f"LVSAConfig.{expected}"):
        LVSAConfig(**{field: value})


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda: lvsa_frame_mask(0, 0), "num_frames must be a positive int, got 0"),
        (lambda: lvsa_frame_mask(41.0, 0), "num_frames must be a positive int"),
        (lambda: lvsa_frame_mask(41, -1), "step must be an int >= 0"),
        (lambda: lvsa_frame_mask(41, True), "step must be an int >= 0"),
        (lambda: keyframe_interval(0), "num_frames must be a positive int"),
    ],
)
def test_bad_pattern_arguments_are_refused(call, expected):
    with pytest.raises(ValueError, match=expected):
        call()


def test_config_must_be_an_lvsa_config():
    with pytest.raises(TypeError, match="config must be an LVSAConfig"):
        lvsa_frame_mask(41, 0, {"window": 3})
