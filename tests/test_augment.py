import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from caid_hf.data import augment
from caid_hf.data.augment import (
    AugmentationConfig,
    Distortion,
    ViewAugmenter,
    color_jitter,
    distort,
    gaussian_blur,
    local_shuffle,
    random_gaussian_blur,
    sample_boxes,
    sample_distortion_codes,
    sample_swaps,
)

# Appearance off: views differ from the crop only by flip and distortion.
PLAIN = {"color_jitter_p": 0.0, "blur_p": 0.0}
NO_DISTORTION = {"cutout_p": 0.0, "outpaint_p": 0.0, "shuffle_p": 0.0}
CUTOUT_ONLY = {"cutout_p": 1.0, "outpaint_p": 0.0, "shuffle_p": 0.0}
OUTPAINT_ONLY = {"cutout_p": 0.0, "outpaint_p": 1.0, "shuffle_p": 0.0}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _crops(batch: int, size: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    return torch.randint(low, 256, (batch, 2, size, size), generator=_gen(seed), dtype=torch.uint8)


def _tolerance(p: float, n: int) -> float:
    """Five binomial standard deviations of a rate estimated from n draws."""
    return 5.0 * math.sqrt(p * (1.0 - p) / n)


def _flip_of_each_view(views: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """bool [B, 2]: which views equal their flipped crop; every view must be the crop or its flip."""
    x = crops.float() / 255.0
    same = (views == x).flatten(2).all(-1)
    flipped = (views == x.flip(-1)).flatten(2).all(-1)
    assert bool((same ^ flipped).all())
    return flipped


def _augment_plain(augmenter: ViewAugmenter, crops: torch.Tensor) -> torch.Tensor:
    """Both views of every image, one grey channel: [B, 2, S, S]."""
    out = augmenter(crops)
    return torch.stack([out.query[:, 0], out.key[:, 0]], dim=1)


# ---------------------------------------------------------------- config


def test_defaults_are_the_reference_values():
    c = AugmentationConfig()
    assert (c.brightness, c.contrast, c.saturation, c.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (c.color_jitter_p, c.blur_p, c.blur_sigma, c.flip_p) == (0.8, 0.5, (0.1, 2.0), 0.5)
    assert (c.cutout_p, c.outpaint_p, c.shuffle_p) == (0.30, 0.05, 0.30)
    assert (c.max_boxes, c.box_stop_p, c.cutout_size, c.outpaint_shrink) == (
        10,
        0.1,
        (10, 70),
        (50, 70),
    )
    assert (c.shuffle_block, c.shuffle_swaps, c.margin, c.reference_size) == ((10, 15), 10, 3, 224)
    assert c.distort_key_view and not c.reference_compat


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"color_jitter_p": 1.5}, "color_jitter_p"),
        ({"box_stop_p": -0.1}, "box_stop_p"),
        ({"cutout_p": 0.5, "shuffle_p": 0.6}, "cutout_p"),
        ({"cutout_size": (70, 10)}, "cutout_size"),
        ({"blur_sigma": (2.0, 0.1)}, "blur_sigma"),
        ({"shuffle_block": (0, 3)}, "shuffle_block"),
        ({"max_boxes": 0}, "max_boxes"),
        ({"hue": 0.7}, "hue"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentationConfig(**kwargs)


def test_config_accepts_lists_from_yaml():
    assert AugmentationConfig(cutout_size=[5, 20]).cutout_size == (5, 20)


def test_pixel_sizes_scale_with_the_view():
    assert AugmentationConfig().geometry(224).cutout_size == (10, 70)
    geo = AugmentationConfig().geometry(448)
    assert geo.cutout_size == (20, 140)
    assert geo.outpaint_shrink == (100, 140)
    assert geo.shuffle_block == (20, 30)
    assert geo.margin == 6
    assert geo.blur_sigma == pytest.approx((0.2, 4.0))
    small = AugmentationConfig().geometry(32)
    assert small.margin == 1 and small.cutout_size == (1, 10)
    assert AugmentationConfig(margin=0).geometry(32).margin == 0
    compat = AugmentationConfig(reference_compat=True).geometry(448)
    assert (compat.cutout_size, compat.margin, compat.blur_sigma) == ((10, 70), 3, (0.1, 2.0))


def test_reference_compat_refuses_views_too_small_for_its_boxes():
    x = torch.rand(2, 1, 64, 64)
    with pytest.raises(ValueError, match="reference_compat"):
        distort(x, _gen(), AugmentationConfig(reference_compat=True))
    crops = _crops(2, 64)
    with pytest.raises(ValueError, match="76"):
        ViewAugmenter(AugmentationConfig(reference_compat=True))(crops)
    # No distortion, nothing to place: the baseline runs at any size.
    out = ViewAugmenter(AugmentationConfig(reference_compat=True), context_prediction=False)(crops)
    assert out.query.shape == (2, 3, 64, 64)
    # Scaled sizes fit the same view.
    assert ViewAugmenter()(crops).query.shape == (2, 3, 64, 64)


# ---------------------------------------------------------------- rates


def test_distortion_mix_matches_the_reference():
    n = 20_000
    expected = {
        Distortion.NONE: 0.35,
        Distortion.CUTOUT: 0.30,
        Distortion.OUTPAINT: 0.05,
        Distortion.SHUFFLE: 0.30,
    }
    codes = sample_distortion_codes(_gen(), n, AugmentationConfig())
    augmenter = ViewAugmenter(seed=1)
    through_augmenter = torch.cat(
        [augmenter(_crops(5000, 16, seed=i)).distortion for i in range(4)]
    )
    for drawn in (codes, through_augmenter):
        assert drawn.dtype == torch.int64 and drawn.shape == (n,)
        fractions = torch.bincount(drawn, minlength=4).double() / n
        for code, p in expected.items():
            assert abs(fractions[code].item() - p) < _tolerance(p, n), (code, fractions)


def test_flip_rate_is_one_half_and_independent_per_view():
    n = 10_000
    crops = _crops(n, 8)
    views = _augment_plain(
        ViewAugmenter(AugmentationConfig(**PLAIN), context_prediction=False), crops
    )
    flipped = _flip_of_each_view(views, crops)
    assert abs(flipped.float().mean().item() - 0.5) < _tolerance(0.5, 2 * n)
    both = (flipped[:, 0] & flipped[:, 1]).float().mean().item()
    assert abs(both - 0.25) < _tolerance(0.25, n)


def test_jitter_rate_is_0_8():
    # On a flat image only brightness changes anything, and b == 1 has probability 0.
    n = 10_000
    crops = torch.full((n, 2, 8, 8), 128, dtype=torch.uint8)
    config = AugmentationConfig(blur_p=0.0)
    views = _augment_plain(ViewAugmenter(config, context_prediction=False), crops)
    jittered = (views != 128 / 255).flatten(2).any(-1)
    assert abs(jittered.float().mean().item() - 0.8) < _tolerance(0.8, 2 * n)
    factor = views[..., 0, 0][jittered] / (128 / 255)
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert factor.min() < 0.62 and factor.max() > 1.38

    _, applied = color_jitter(torch.rand(20_000, 1, 2, 2), _gen())
    assert abs(applied.float().mean().item() - 0.8) < _tolerance(0.8, 20_000)


def test_blur_rate_is_one_half():
    # A sharp horizontal edge: any Gaussian, even sigma 0.1 (neighbour weight e^-50),
    # lifts the dark pixel next to the edge above 0. Absolute sigmas keep that visible.
    n = 4000
    crops = torch.zeros(n, 2, 16, 16, dtype=torch.uint8)
    crops[:, :, 8:] = 255
    config = AugmentationConfig(color_jitter_p=0.0, reference_compat=True)
    views = _augment_plain(ViewAugmenter(config, context_prediction=False), crops)
    blurred = ((views > 0) & (views < 1)).flatten(2).any(-1)
    assert abs(blurred.float().mean().item() - 0.5) < _tolerance(0.5, 2 * n)

    x = torch.rand(20_000, 1, 4, 4)
    out, applied = random_gaussian_blur(x, _gen(), p=0.5, sigma_range=(0.5, 1.0))
    assert abs(applied.float().mean().item() - 0.5) < _tolerance(0.5, 20_000)
    assert torch.equal(out[~applied], x[~applied])
    assert bool((out[applied] != x[applied]).flatten(1).any(1).all())


# ---------------------------------------------------------------- appearance


def test_color_jitter_matches_torchvision_ops_in_both_orders():
    n = 512
    x = torch.rand(n, 1, 12, 12)
    out, applied = color_jitter(x, _gen(3), brightness=0.4, contrast=0.4, p=0.8)
    g = _gen(3)  # the draws documented by color_jitter
    draws = [torch.rand(n, generator=g) for _ in range(4)]
    b, c, brightness_first = 0.6 + 0.8 * draws[1], 0.6 + 0.8 * draws[2], draws[3] < 0.5
    assert torch.equal(applied, draws[0] < 0.8)
    rgb = x.expand(-1, 3, -1, -1)
    for i in range(n):
        if not applied[i]:
            assert torch.equal(out[i], x[i])
            continue
        if brightness_first[i]:
            expected = TF.adjust_contrast(TF.adjust_brightness(rgb[i], b[i].item()), c[i].item())
        else:
            expected = TF.adjust_brightness(TF.adjust_contrast(rgb[i], c[i].item()), b[i].item())
        # torchvision's grey weights sum to 0.9999, hence the tolerance
        torch.testing.assert_close(out[i], expected[:1], atol=3e-4, rtol=0)
    assert 0.3 < brightness_first[applied].float().mean() < 0.7


def test_saturation_and_hue_do_nothing_on_grey_images():
    grey = torch.rand(3, 1, 10, 10).expand(-1, 3, -1, -1)
    torch.testing.assert_close(TF.adjust_saturation(grey, 1.4), grey, atol=3e-4, rtol=0)
    torch.testing.assert_close(TF.adjust_hue(grey, 0.1), grey, atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sample():
    x = torch.rand(3, 1, 40, 40)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    out = gaussian_blur(x, sigma, radius=6)
    for i in range(3):
        s = sigma[i].item()
        expected = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[s, s])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)  # sigma 0.1 barely blurs


# ---------------------------------------------------------------- cut-out and out-painting


def test_number_of_boxes_follows_the_stopping_rule():
    n = 20_000
    boxes = sample_boxes(_gen(), n, 224, (10, 70), max_boxes=10, stop_p=0.1, margin=3)
    counts = boxes.count
    pmf = [0.9 ** (k - 1) * 0.1 for k in range(1, 10)] + [0.9**9]
    mean = sum(k * p for k, p in zip(range(1, 11), pmf, strict=True))
    std = math.sqrt(sum(k * k * p for k, p in zip(range(1, 11), pmf, strict=True)) - mean**2)
    assert mean == pytest.approx((1 - 0.9**10) / 0.1)  # 6.513
    assert abs(counts.double().mean().item() - mean) < 5 * std / math.sqrt(n)
    frequency = torch.bincount(counts, minlength=11).double() / n
    assert frequency[0] == 0
    assert abs(frequency[1].item() - 0.1) < _tolerance(0.1, n)
    assert abs(frequency[10].item() - 0.9**9) < _tolerance(0.9**9, n)
    # active boxes are a prefix: no box after the sequence stopped
    assert torch.equal(boxes.active, boxes.active.cummin(dim=1).values)


@pytest.mark.parametrize("size, sides, margin", [(224, (10, 70), 3), (448, (20, 140), 6)])
def test_box_sides_and_positions(size, sides, margin):
    geo = AugmentationConfig().geometry(size)
    assert (geo.cutout_size, geo.margin) == (sides, margin)
    boxes = sample_boxes(_gen(), 2000, size, geo.cutout_size, margin=geo.margin)
    for side, start in ((boxes.height, boxes.top), (boxes.width, boxes.left)):
        assert side.min() == sides[0] and side.max() == sides[1]
        assert start.min() == margin and (start + side).max() == size - margin


def _union_of_rectangles(boxes, size: int) -> torch.Tensor:
    mask = torch.zeros(boxes.top.shape[0], 1, size, size, dtype=torch.bool)
    for b, k in boxes.active.nonzero().tolist():
        top, left = boxes.top[b, k].item(), boxes.left[b, k].item()
        mask[b, 0, top : top + boxes.height[b, k], left : left + boxes.width[b, k]] = True
    return mask


@pytest.mark.parametrize("size", [224, 448])
def test_cutout_zeroes_its_boxes_and_nothing_else(size):
    batch = 16
    config = AugmentationConfig(**CUTOUT_ONLY)
    geo = config.geometry(size)
    x = torch.rand(batch, 1, size, size) * 0.9 + 0.1
    out, codes = distort(x, _gen(7), config)
    assert bool((codes == Distortion.CUTOUT).all())
    g = _gen(7)  # distort draws the codes, then the cut-out boxes
    torch.rand(batch, generator=g)
    boxes = sample_boxes(g, batch, size, geo.cutout_size, margin=geo.margin)
    mask = _union_of_rectangles(boxes, size)
    assert torch.equal(boxes.mask(size), mask)
    assert bool((out[mask] == 0).all())
    assert torch.equal(out[~mask], x[~mask])
    low, high = geo.cutout_size
    for side in (boxes.height, boxes.width):
        assert low <= side.min() and side.max() <= high
    border = torch.ones(size, size, dtype=torch.bool)
    border[geo.margin : size - geo.margin, geo.margin : size - geo.margin] = False
    assert not bool(mask[:, 0, border].any())


def test_outpainting_keeps_values_only_inside_its_windows():
    batch, size = 16, 224
    config = AugmentationConfig(**OUTPAINT_ONLY)
    x = torch.rand(batch, 1, size, size) * 0.9 + 0.1
    out, codes = distort(x, _gen(5), config)
    assert bool((codes == Distortion.OUTPAINT).all())
    g = _gen(5)  # codes, cut-out boxes (unused), then the windows
    torch.rand(batch, generator=g)
    sample_boxes(g, batch, size, (10, 70))
    windows = sample_boxes(g, batch, size, (size - 70, size - 50))
    keep = _union_of_rectangles(windows, size)
    assert torch.equal(out[keep], x[keep])
    assert bool((out[~keep] == 0).all())
    for side in (windows.height, windows.width):
        assert 154 <= side.min() and side.max() <= 174
    assert bool((out[:, :, :3] == 0).all()) and bool((out[:, :, :, -3:] == 0).all())


# ---------------------------------------------------------------- local shuffle


def _numpy_swaps(x: np.ndarray, swaps) -> np.ndarray:
    out = x.copy()
    for b in range(out.shape[0]):
        img = out[b, 0]
        for t in range(swaps.height.shape[1]):
            h, w = swaps.height[b, t].item(), swaps.width[b, t].item()
            ya, xa = swaps.top_a[b, t].item(), swaps.left_a[b, t].item()
            yb, xb = swaps.top_b[b, t].item(), swaps.left_b[b, t].item()
            if abs(ya - yb) < h and abs(xa - xb) < w:
                continue  # overlapping blocks: skipped
            a = img[ya : ya + h, xa : xa + w].copy()
            bb = img[yb : yb + h, xb : xb + w].copy()
            img[ya : ya + h, xa : xa + w] = bb
            img[yb : yb + h, xb : xb + w] = a
    return out


def test_local_shuffle_is_the_sequential_block_swap():
    batch, size = 128, 96
    x = torch.rand(batch, 1, size, size)
    out = local_shuffle(x, _gen(11), block_size=(10, 15), swaps=10, margin=3)
    swaps = sample_swaps(_gen(11), batch, size, (10, 15), 10, 3)
    assert torch.equal(out, torch.from_numpy(_numpy_swaps(x.numpy(), swaps)))
    assert swaps.height.min() == 10 and swaps.width.max() == 15
    overlap = (
        ((swaps.top_a - swaps.top_b).abs() < swaps.height)
        & ((swaps.left_a - swaps.left_b).abs() < swaps.width)
    ).any(dim=1)
    assert int(overlap.sum()) > 5  # the overlapping case is exercised at this size

    # Every sample, overlapping draws included, is a permutation: the multiset is kept.
    flat_in, flat_out = x.flatten(1), out.flatten(1)
    assert torch.equal(flat_in.sort(dim=1).values, flat_out.sort(dim=1).values)
    index = swaps.index(size)
    assert torch.equal(index.sort(dim=1).values, torch.arange(size * size).expand_as(index))
    assert bool((flat_in != flat_out).any(dim=1).all())

    inner = torch.zeros(size, size, dtype=torch.bool)
    inner[3:-3, 3:-3] = True
    assert torch.equal(out[:, :, ~inner], x[:, :, ~inner])


def test_shuffle_through_distort_keeps_pixel_values():
    batch, size = 32, 224
    config = AugmentationConfig(cutout_p=0.0, outpaint_p=0.0, shuffle_p=1.0)
    x = torch.rand(batch, 1, size, size)
    out, codes = distort(x, _gen(2), config)
    assert bool((codes == Distortion.SHUFFLE).all())
    assert bool((out != x).flatten(1).any(1).all())
    assert torch.equal(out[:, :, :3], x[:, :, :3]) and torch.equal(out[..., -3:], x[..., -3:])
    # a permutation of each image's pixels
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


# ---------------------------------------------------------------- views and target


def test_output_types_ranges_and_channels():
    crops = _crops(8, 32)
    out = ViewAugmenter()(crops)
    for view in (out.query, out.key):
        assert view.dtype == torch.float32 and view.shape == (8, 3, 32, 32)
        assert view.min() >= 0 and view.max() <= 1
        assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 0], view[:, 2])
    assert out.target.dtype == torch.float32 and out.target.shape == (8, 1, 32, 32)
    assert out.target.min() >= 0 and out.target.max() <= 1
    assert out.distortion.dtype == torch.int64 and out.distortion.shape == (8,)


def test_target_is_the_original_query_crop_flipped_with_the_query():
    crops = _crops(256, 32)
    original = crops[:, :1].float() / 255.0
    plain = ViewAugmenter(AugmentationConfig(**PLAIN, **NO_DISTORTION))(crops)
    flipped = _flip_of_each_view(plain.query[:, :1], crops[:, :1])[:, 0]
    assert 0.35 < flipped.float().mean() < 0.65
    assert torch.equal(plain.target, plain.query[:, :1])  # same flip, nothing else

    full = ViewAugmenter()(crops)
    flipped = _flip_of_each_view(full.target, crops[:, :1])[:, 0]
    assert 0.35 < flipped.float().mean() < 0.65
    assert torch.equal(full.target[~flipped], original[~flipped])


def test_reference_compat_never_flips_the_target():
    crops = _crops(128, 80)
    config = AugmentationConfig(**PLAIN, **NO_DISTORTION, reference_compat=True)
    out = ViewAugmenter(config)(crops)
    assert torch.equal(out.target, crops[:, :1].float() / 255.0)
    query_flipped = _flip_of_each_view(out.query[:, :1], crops[:, :1])[:, 0]
    assert 0.3 < query_flipped.float().mean() < 0.7


def test_context_prediction_off_means_no_distortion_and_no_target():
    crops = _crops(64, 32, low=1)
    out = ViewAugmenter(AugmentationConfig(**PLAIN, **CUTOUT_ONLY), context_prediction=False)(crops)
    assert out.target is None
    assert bool((out.distortion == 0).all())
    views = torch.stack([out.query[:, 0], out.key[:, 0]], dim=1)
    _flip_of_each_view(views, crops)  # only flips, no zeroed boxes


def test_key_view_left_undistorted_on_request():
    crops = _crops(64, 32, low=1)
    config = AugmentationConfig(**PLAIN, **CUTOUT_ONLY, flip_p=0.0, distort_key_view=False)
    out = ViewAugmenter(config)(crops)
    assert torch.equal(out.key[:, 0], crops[:, 1].float() / 255.0)
    assert bool((out.query == 0).flatten(1).any(1).all())
    assert bool((out.distortion == Distortion.CUTOUT).all())
    both = ViewAugmenter(AugmentationConfig(**PLAIN, **CUTOUT_ONLY, flip_p=0.0))(crops)
    assert bool((both.key == 0).flatten(1).any(1).all())


def test_invalid_crops_are_refused():
    augmenter = ViewAugmenter()
    with pytest.raises(TypeError, match="uint8"):
        augmenter(torch.rand(2, 2, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 2, S, S\]"):
        augmenter(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="square"):
        augmenter(torch.zeros(2, 2, 32, 40, dtype=torch.uint8))
    with pytest.raises(ValueError):
        augmenter(torch.zeros(2, 32, 32, dtype=torch.uint8))


# ---------------------------------------------------------------- randomness


def _assert_same(a, b):
    assert torch.equal(a.query, b.query) and torch.equal(a.key, b.key)
    assert torch.equal(a.target, b.target) and torch.equal(a.distortion, b.distortion)


def test_same_seed_same_views_and_global_rng_untouched():
    crops = _crops(16, 64)
    global_state = torch.get_rng_state()
    first = ViewAugmenter(seed=3)(crops)
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(1234)
    _assert_same(first, ViewAugmenter(seed=3)(crops))
    other = ViewAugmenter(seed=4)(crops)
    assert not torch.equal(first.query, other.query)


def test_state_dict_round_trip_resumes_the_stream():
    crops = [_crops(8, 64, seed=i) for i in range(3)]
    augmenter = ViewAugmenter(seed=9)
    assert augmenter.state_dict() == {
        "streams": [{"seed": 9, "device": None, "generator_state": None}]
    }
    augmenter(crops[0])
    state = augmenter.state_dict()
    assert state["streams"][0]["device"] == "cpu"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    expected = [augmenter(crops[1]), augmenter(crops[2])]

    resumed = ViewAugmenter(seed=0)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.seed == 9
    assert torch.equal(resumed.state_dict()["streams"][0]["generator_state"],
                       state["streams"][0]["generator_state"])
    for batch, want in zip(crops[1:], expected, strict=True):
        _assert_same(resumed(batch), want)

    # loading into a running augmenter rewinds it too
    augmenter.load_state_dict(state)
    _assert_same(augmenter(crops[1]), expected[0])


def test_each_process_resumes_its_own_stream(monkeypatch):
    # The state holds every process's stream; process 1 must continue stream 1, not 0's.
    crops = _crops(8, 64)
    streams = [ViewAugmenter(seed=1000), ViewAugmenter(seed=1001)]
    for a in streams:
        a(crops)
    state = {"streams": [a.state_dict()["streams"][0] for a in streams]}
    continued = [a(crops) for a in streams]

    monkeypatch.setattr(augment, "_world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(augment, "_process_index", lambda rank=rank: rank)
        resumed = ViewAugmenter(seed=7)
        resumed.load_state_dict(state)
        assert resumed.seed == 1000 + rank
        _assert_same(resumed(crops), continued[rank])
    assert not torch.equal(continued[0].query, continued[1].query)


def test_state_from_another_process_count_is_refused(monkeypatch):
    augmenter = ViewAugmenter(seed=1)
    augmenter(_crops(2, 32))
    state = augmenter.state_dict()
    monkeypatch.setattr(augment, "_world_size", lambda: 2)
    with pytest.raises(ValueError, match="saved by 1 process"):
        ViewAugmenter().load_state_dict(state)
