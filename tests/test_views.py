"""Batched view generation: shapes, determinism, replay, and one test per op that fails if the
op were skipped or applied to the wrong samples."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ssl_lab.config import load_config
from ssl_lab.data import augment as A
from ssl_lab.data import color as C
from ssl_lab.data.views import RECIPES, Recipe, ViewGenerator, get_recipe, save_view_grid
from ssl_lab.errors import UserError

N, S = 12, 16


def smooth_images(n: int = N, size: int = S, c: int = 3, seed: int = 0) -> torch.Tensor:
    """uint8 (n, size, size, c) with structure (blurry blobs), so ops have something to change."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(images: torch.Tensor, recipe: Recipe | str, size: int = S, n_views: int = 2,
         seed: int = 0):
    vg = ViewGenerator(recipe, size, n_views)
    views, params = vg(images, gen(seed), return_params=True)
    return vg, views, params


ONLY = Recipe(name="only", crop_scale=None)  # base for single-op recipes: nothing but resize


# --- shapes, ranges, determinism, replay -------------------------------------------------------

@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("v", [2, 3])
def test_shapes_ranges_and_replay(name: str, c: int, v: int) -> None:
    images = smooth_images(c=c, size=20)
    vg, views, params = make(images, name, size=S, n_views=v)
    assert views.shape == (v, N, c, S, S) and views.dtype == torch.float32
    assert len(params) == v and all(t.shape[0] == N for p in params for t in p.values())
    if name != "noise":
        assert views.min() >= 0 and views.max() <= 1 + 1e-6
    assert torch.equal(vg.replay(images, params), views)


def test_same_seed_same_views_other_seed_other_views() -> None:
    images = smooth_images()
    vg = ViewGenerator("byol", S, 2)
    a, b, c = vg(images, gen(1)), vg(images, gen(1)), vg(images, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", ["simclr", "none"])
def test_each_call_returns_a_fresh_tensor(name: str) -> None:
    images = smooth_images()
    vg = ViewGenerator(name, S, 2)
    first = vg(images, gen(1))
    kept = first.clone()
    vg(images, gen(2))  # reuses the generator's scratch buffers
    assert torch.equal(first, kept)


def test_views_of_one_image_differ_and_samples_get_different_params() -> None:
    images = smooth_images(n=32)
    _, views, params = make(images, "simclr")
    assert not torch.allclose(views[0], views[1])
    p = params[0]
    assert p["crop"].unique(dim=0).shape[0] > 16
    assert p["brightness"].unique().numel() > 16 and 0 < p["flip"].sum() < 32
    assert not torch.equal(params[0]["crop"], params[1]["crop"])


def test_non_square_and_upsampled_inputs() -> None:
    images = smooth_images(size=24)[:, :, :20]  # (N, 24, 20, 3)
    for name in ("simclr", "none", "noise"):
        assert make(images, name, size=28)[1].shape == (2, N, 3, 28, 28)


def test_grayscale_input_stays_one_channel_and_skips_colour_ops() -> None:
    images = smooth_images(c=1)
    _, views, params = make(images, "simclr")
    assert views.shape[2] == 1 and "grayscale" not in params[0]
    _, views, _ = make(images, jitter_only(saturation=0.5, hue=0.5))
    torch.testing.assert_close(views[0], as_float(images))
    _, views, params = make(images, jitter_only(brightness=0.5, contrast=0.5))
    assert not torch.allclose(views[0], as_float(images))


def test_unknown_recipe_and_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="simclr"):
        get_recipe("simclr2")
    with pytest.raises(UserError):
        ViewGenerator("nope", 32)
    with pytest.raises(UserError):
        ViewGenerator("simclr", 0)
    with pytest.raises(UserError):
        ViewGenerator("simclr", 32, n_views=0)
    with pytest.raises(UserError):
        ViewGenerator("simclr", 32)(torch.zeros(2, 8, 8, 4, dtype=torch.uint8), gen())
    with pytest.raises(UserError):
        Recipe(crop_scale=(0.5, 2.0))


def test_recipe_values() -> None:
    assert "weak" in RECIPES and "none" in RECIPES
    assert get_recipe("noise", noise_std=0.3).noise_std == 0.3
    byol = get_recipe("byol")
    assert [byol.prob("blur_p", v) for v in range(4)] == [1.0, 0.1, 1.0, 0.1]
    assert [byol.prob("solarize_p", v) for v in range(2)] == [0.0, 0.2]
    assert get_recipe("simclr").crop_scale == (0.2, 1.0)
    assert get_recipe("simclr", size=224).crop_scale == (0.08, 1.0)


def test_fast_views_are_on_above_64_px_unless_overridden() -> None:
    assert not get_recipe("simclr").fast and not get_recipe("simclr", size=64).fast
    assert get_recipe("simclr", size=96).fast and get_recipe("noise", size=96).fast
    assert not get_recipe("simclr", size=224, fast=False).fast
    assert get_recipe("simclr", size=32, fast=True).fast
    assert ViewGenerator("simclr", 96).recipe.fast and not ViewGenerator("simclr", 96, fast=False).recipe.fast
    assert load_config(None, ["views.fast=true"]).views.fast is True
    assert load_config(None, []).views.fast is None


# --- one test per op ---------------------------------------------------------------------------

def test_crop_box_maps_the_right_region() -> None:
    images = smooth_images(n=4, size=32)
    vg = ViewGenerator(Recipe(name="crop", crop_scale=(0.1, 1.0)), 16, 1)
    quadrants = torch.tensor([[0, 0, 16, 16], [0, 16, 16, 16], [16, 0, 16, 16], [16, 16, 16, 16]])
    out = vg.replay(images, [{"crop": quadrants}])[0]
    x = as_float(images)
    for i, (top, left, _, _) in enumerate(quadrants.tolist()):
        torch.testing.assert_close(out[i], x[i, :, top:top + 16, left:left + 16])


def test_crop_resize_matches_bilinear_interpolate_of_the_box() -> None:
    images = smooth_images(n=2, size=32)
    vg = ViewGenerator(Recipe(name="crop", crop_scale=(0.1, 1.0)), 24, 1)
    boxes = torch.tensor([[3, 5, 12, 20], [0, 0, 32, 32]])
    out = vg.replay(images, [{"crop": boxes}])[0]
    x = as_float(images)
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(24, 24), mode="bilinear",
                            align_corners=False)[0]
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)


def test_antialiased_crops_match_interpolate_with_antialias_then_flip() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 28, 28, 1), generator=g, dtype=torch.uint8)  # sharp
    boxes = torch.tensor([[0, 0, 28, 28], [2, 3, 20, 25], [5, 7, 6, 9], [1, 0, 27, 14]])
    flip = torch.tensor([False, True, False, True])
    recipe = Recipe(name="crop", crop_scale=(0.1, 1.0), antialias=True)
    out = ViewGenerator(recipe, 12, 1).replay(images, [{"crop": boxes, "flip": flip}])[0]
    plain = ViewGenerator(replace(recipe, antialias=False), 12, 1).replay(
        images, [{"crop": boxes, "flip": flip}])[0]
    x = as_float(images)
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(12, 12), mode="bilinear",
                            antialias=True, align_corners=False)[0]
        ref = ref.flip(-1) if flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)
        if h > 12:  # shrinking crops of a noisy image: antialiasing must change them
            assert (out[i] - plain[i]).abs().max() > 0.05
        else:  # a crop that grows is plain bilinear either way
            torch.testing.assert_close(out[i], plain[i], atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["simclr", "vicreg"])
@pytest.mark.parametrize("fast", [False, True])
def test_antialiased_views_of_whole_recipes_replay_exactly_and_stay_in_range(name: str,
                                                                              fast: bool) -> None:
    images = smooth_images(n=8, size=40)
    vg = ViewGenerator(get_recipe(name, size=24, fast=fast, antialias=True), 24, 2)
    views, params = vg(images, gen(), return_params=True)
    assert torch.equal(vg.replay(images, params), views)
    assert views.min() >= 0 and views.max() <= 1 and views.shape == (2, 8, 3, 24, 24)


def test_crop_min_scale_and_antialias_reach_the_recipe_from_the_config() -> None:
    cfg = load_config(None, ["views.crop_min_scale=0.35", "views.antialias=true"])
    r = get_recipe(cfg.views.recipe, size=20, **cfg.views.recipe_options())
    assert r.crop_scale == (0.35, 1.0) and r.antialias
    assert get_recipe("simclr", size=224, crop_min_scale=0.35).crop_scale == (0.35, 1.0)
    assert get_recipe("simclr").crop_scale == (0.2, 1.0) and not get_recipe("simclr").antialias
    _, _, params = make(smooth_images(n=256, size=32), r, n_views=1)
    top, left, h, w = params[0]["crop"].T.float()
    assert (h * w / 32**2).min() > 0.33
    with pytest.raises(UserError, match="does not crop"):
        get_recipe("noise", crop_min_scale=0.3)
    with pytest.raises(UserError, match="crop_min_scale"):
        load_config(None, ["views.crop_min_scale=0"])


def test_sampled_crop_boxes_respect_scale_and_ratio() -> None:
    images = smooth_images(n=256, size=64)
    r = get_recipe("simclr")
    _, _, params = make(images, r, n_views=1)
    top, left, h, w = params[0]["crop"].T.float()
    area = h * w / 64**2
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 64).all() and (left + w <= 64).all()
    assert area.min() > 0.18 and area.max() <= 1.0 and area.std() > 0.1
    assert ((w / h) > 0.7).all() and ((w / h) < 1.4).all()


def test_crop_fallback_is_centre_crop() -> None:
    u = torch.ones(3, 2 * A.N_CROP_TRIES + 2) * 0.999  # area near 100% at ratio 4/3: never fits
    boxes = A.sample_crop_boxes(u, 30, 30, (0.99, 1.0), (1.3, 1.4))
    # torchvision's fallback: full width, height = round(30 / 1.3) = 23, centred
    assert boxes.tolist() == [[3, 0, 23, 30]] * 3


def test_flip_mirrors_exactly_the_flipped_samples() -> None:
    images = smooth_images()
    _, views, params = make(images, Recipe(name="flip", crop_scale=None, flip_p=0.5))
    x = as_float(images)
    assert 0 < sum(int(p["flip"].sum()) for p in params) < 2 * N
    for v in range(2):
        flip = params[v]["flip"]
        expect = torch.where(flip[:, None, None, None], x.flip(-1), x)
        torch.testing.assert_close(views[v], expect, atol=1e-6, rtol=0)


def jitter_only(**strengths: float) -> Recipe:
    base = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    return Recipe(name="jitter", crop_scale=None, jitter_p=1.0, **{**base, **strengths})


def test_brightness_scales_and_clamps() -> None:
    images = smooth_images()
    _, views, params = make(images, jitter_only(brightness=0.4))
    b = params[0]["brightness"]
    assert (b != 1).all()
    expect = (as_float(images) * b[:, None, None, None]).clamp(0, 1)
    torch.testing.assert_close(views[0], expect, atol=1e-6, rtol=0)
    assert not torch.allclose(views[0].mean((1, 2, 3)), as_float(images).mean((1, 2, 3)))


def test_contrast_blends_with_mean_luma() -> None:
    images = smooth_images()
    _, views, params = make(images, jitter_only(contrast=0.4))
    c = params[0]["contrast"][:, None, None, None]
    x = as_float(images)
    luma = (x * torch.tensor(C.GRAY_RGB)[:, None, None]).sum(1, keepdim=True)
    mean = luma.mean((2, 3), keepdim=True)
    torch.testing.assert_close(views[0], (c * x + (1 - c) * mean).clamp(0, 1), atol=1e-5, rtol=0)


def test_saturation_keeps_luma_and_scales_chroma() -> None:
    images = smooth_images()
    _, views, params = make(images, jitter_only(saturation=0.5))
    x, s = as_float(images), params[0]["saturation"][:, None, None, None]
    gray = (x * torch.tensor(C.GRAY_RGB)[:, None, None]).sum(1, keepdim=True)
    torch.testing.assert_close(views[0], (s * x + (1 - s) * gray).clamp(0, 1), atol=1e-5, rtol=0)


def test_hue_rotates_chroma_and_keeps_luma() -> None:
    # Mid-grey plus a small colour so the rotation never leaves [0, 1] (no clamping).
    pix = torch.tensor([[0.5, 0.45, 0.4]]).repeat(N, 1)
    images = (pix[:, None, None, :].expand(N, 4, 4, 3) * 255).round().to(torch.uint8)
    _, views, params = make(images, jitter_only(hue=0.5), size=4)
    x, y = as_float(images), views[0]
    yiq = torch.tensor(C._YIQ)
    luma = torch.einsum("ij,njhw->nihw", yiq, x)
    luma_y = torch.einsum("ij,njhw->nihw", yiq, y)
    torch.testing.assert_close(luma_y[:, 0], luma[:, 0], atol=1e-5, rtol=0)
    angle = torch.atan2(luma_y[:, 2, 0, 0], luma_y[:, 1, 0, 0]) - torch.atan2(luma[:, 2, 0, 0],
                                                                               luma[:, 1, 0, 0])
    turns = torch.remainder(angle / (2 * math.pi) - params[0]["hue"], 1.0)
    assert torch.minimum(turns, 1 - turns).max() < 1e-3
    assert (params[0]["hue"].abs() > 0.01).any()


def reference_jitter(x: torch.Tensor, factors: list[float], order: list[int],
                     clamp_each: bool = True) -> torch.Tensor:
    """One image (3, H, W), torchvision-style: each op then a clamp, in the given order.
    clamp_each=False: no clamp at all (the chain DALI's ColorTwist applies before its one)."""
    b, c, s, h = factors
    w = torch.tensor(C.GRAY_RGB)[:, None, None]
    for op in order:
        if op == 0:
            x = x * b
        elif op == 1:
            x = c * x + (1 - c) * (x * w).sum(0).mean()
        elif op == 2:
            x = s * x + (1 - s) * (x * w).sum(0, keepdim=True)
        else:
            x = (C._hue_matrices(torch.tensor([h]))[0] @ x.reshape(3, -1)).view_as(x)
        x = x.clamp(0, 1) if clamp_each else x
    return x


def test_jitter_matches_per_image_reference_in_each_sample_order() -> None:
    images = smooth_images(n=32)
    recipe = jitter_only(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5)
    _, views, params = make(images, recipe)
    p, x = params[0], as_float(images)
    for i in range(32):
        factors = [float(p[k][i]) for k in ("brightness", "contrast", "saturation", "hue")]
        ref = reference_jitter(x[i], factors, p["jitter_order"][i].tolist())
        torch.testing.assert_close(views[0][i], ref, atol=1e-5, rtol=0)
    # the order matters with these strengths: a fixed order would not pass the loop above
    fixed = [reference_jitter(x[i], [float(p[k][i]) for k in JITTER], [0, 1, 2, 3])
             for i in range(32)]
    assert not torch.allclose(views[0], torch.stack(fixed), atol=1e-3)


JITTER = ("brightness", "contrast", "saturation", "hue")


def reference_fused(x: torch.Tensor, factors: list[float], order: list[int], gray: bool
                    ) -> torch.Tensor:
    """One image, DALI ColorTwist-style: the chain unclamped, grayscale, then one clamp."""
    x = reference_jitter(x, factors, order, clamp_each=False)
    if gray:
        x = (x * torch.tensor(C.GRAY_RGB)[:, None, None]).sum(0, keepdim=True).expand(3, -1, -1)
    return x.clamp(0, 1)


def test_fast_colour_is_one_clamp_after_the_whole_chain() -> None:
    images = smooth_images(n=32)
    recipe = replace(jitter_only(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5),
                     grayscale_p=0.5, fast=True)
    _, fast, params = make(images, recipe)
    _, exact, _ = make(images, replace(recipe, fast=False))  # same seed: same parameters
    p, x = params[0], as_float(images)
    assert 0 < p["grayscale"].sum() < 32
    for i in range(32):
        factors = [float(p[k][i]) for k in JITTER]
        ref = reference_fused(x[i], factors, p["jitter_order"][i].tolist(), bool(p["grayscale"][i]))
        torch.testing.assert_close(fast[0][i], ref, atol=1e-5, rtol=0)
    # strong factors push values out of [0, 1] mid-chain: the two semantics really differ there
    assert (fast[0] - exact[0]).abs().amax() > 0.05


def test_fast_colour_equals_exact_colour_when_no_clamp_binds() -> None:
    g = torch.Generator().manual_seed(4)
    images = (90 + 76 * torch.rand(48, 8, 8, 3, generator=g)).to(torch.uint8)  # [0.35, 0.65]
    recipe = replace(jitter_only(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
                     grayscale_p=0.3)
    _, exact, _ = make(images, recipe, size=8)
    _, fast, _ = make(images, replace(recipe, fast=True), size=8)
    assert (exact - as_float(images)[None]).abs().amax() > 0.05  # the jitter did something
    torch.testing.assert_close(fast, exact, atol=2e-6, rtol=0)


def test_jitter_probability_and_order_are_per_sample() -> None:
    images = smooth_images(n=400, size=4)
    _, _, params = make(images, get_recipe("simclr"), size=4)
    p = params[0]
    assert 0.7 < p["jitter"].float().mean() < 0.9
    assert (p["brightness"][~p["jitter"]] == 1).all() and (p["hue"][~p["jitter"]] == 0).all()
    assert p["jitter_order"].unique(dim=0).shape[0] == 24  # all 4! orders occur
    assert (p["jitter_order"].sort(dim=1).values == torch.arange(4)).all()


def test_grayscale_makes_channels_equal_only_where_drawn() -> None:
    images = smooth_images(n=64)
    _, views, params = make(images, Recipe(name="g", crop_scale=None, grayscale_p=0.5))
    for v in range(2):
        mask = params[v]["grayscale"]
        assert 0 < mask.sum() < 64
        spread = views[v].amax(1) - views[v].amin(1)
        assert (spread[mask] < 1e-6).all() and (spread[~mask].amax((1, 2)) > 0.01).all()
        torch.testing.assert_close(views[v][~mask], as_float(images)[~mask])


def test_solarize_inverts_above_threshold_only_where_drawn() -> None:
    images = smooth_images(n=64)
    _, views, params = make(images, Recipe(name="s", crop_scale=None, solarize_p=0.5))
    x = as_float(images)
    mask = params[0]["solarize"]
    assert 0 < mask.sum() < 64
    expect = torch.where(x >= 0.5, 1 - x, x)
    torch.testing.assert_close(views[0][mask], expect[mask])
    torch.testing.assert_close(views[0][~mask], x[~mask])


def high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    return (x.diff(dim=-1) ** 2).mean((1, 2, 3)) + (x.diff(dim=-2) ** 2).mean((1, 2, 3))


def test_blur_matches_reference_and_reduces_high_frequencies() -> None:
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(N, 32, 32, 3, generator=g) * 255).to(torch.uint8)  # noisy: lots of HF
    recipe = Recipe(name="b", crop_scale=None, blur_p=(1.0, 0.0), blur_kernel_frac=0.2)
    _, views, params = make(images, recipe, size=32)
    x, sigma = as_float(images), params[0]["blur_sigma"]
    assert params[0]["blur"].all() and not params[1]["blur"].any()
    assert (high_freq_energy(views[0]) < high_freq_energy(x)).all()
    torch.testing.assert_close(views[1], x)
    k = A.blur_kernel_size(32, 0.2)
    for i in range(0, N, 5):  # reference: torchvision's kernel, reflect padding, 2-D conv
        pos = torch.arange(k) - k // 2
        k1 = torch.exp(-0.5 * (pos / sigma[i]) ** 2)
        k1 = k1 / k1.sum()
        k2 = (k1[:, None] * k1[None, :]).expand(3, 1, k, k)
        ref = F.conv2d(F.pad(x[i:i + 1], (k // 2,) * 4, mode="reflect"), k2, groups=3)[0]
        torch.testing.assert_close(views[0][i], ref, atol=1e-5, rtol=0)


def test_blur_band_matmul_equals_convolution() -> None:
    x = torch.rand(6, 3, 10, 12)
    sigma, mask = torch.rand(6) * 2 + 0.1, torch.tensor([True, False] * 3)
    ref = A._blur_conv(x, A.gauss_kernels(sigma, mask, 5))
    torch.testing.assert_close(A.gaussian_blur(x, sigma, mask, 5, torch.empty_like(x)), ref)


def test_large_blur_on_cpu_touches_only_masked_samples() -> None:
    """Above 64 px the CPU path blurs only the masked samples: same result as the whole-batch
    convolution, and unmasked samples are returned exactly."""
    x = torch.rand(6, 3, 72, 70)
    sigma, mask = torch.rand(6) * 2 + 0.1, torch.tensor([True, False, False, True, False, True])
    ref = A._blur_conv(x, A.gauss_kernels(sigma, mask, 7))
    out = A.gaussian_blur(x.clone(), sigma, mask, 7, torch.empty_like(x))
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[~mask], x[~mask])
    assert not torch.allclose(out[mask], x[mask])


def test_bf16_blur_is_the_fp32_blur_to_bf16_precision_and_stays_in_range() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 3, 72, 72, generator=g)
    x[0] = 1.0  # a white image: rounded taps must not push it above 1
    sigma, mask = 0.1 + 1.9 * torch.rand(8, generator=g), torch.tensor([True, False] * 4)
    ref = A.gaussian_blur(x.clone(), sigma, mask, 7, torch.empty_like(x))
    low = A.gaussian_blur(x.clone(), sigma, mask, 7, torch.empty_like(x), bf16=True)
    # three bf16 roundings (input, between the passes, output) of values up to 1: <= ~2.5/255
    torch.testing.assert_close(low, ref, atol=1e-2, rtol=0)
    assert (low - ref).abs().mean() < 1e-3
    assert not torch.equal(low, ref) and low.max() <= 1 and low.min() >= 0
    assert torch.equal(low[~mask], x[~mask])


def test_fast_views_at_96_px_replay_exactly_and_stay_in_range() -> None:
    images = smooth_images(n=6, size=100)
    vg, views, params = make(images, "byol", size=96)
    assert vg.recipe.fast and views.shape == (2, 6, 3, 96, 96)
    assert views.min() >= 0 and views.max() <= 1
    assert torch.equal(vg.replay(images, params), views)


def test_noise_has_requested_std_and_no_crop() -> None:
    images = smooth_images(n=32)
    _, views, params = make(images, get_recipe("noise", noise_std=0.2))
    delta = views - as_float(images)[None]
    assert abs(float(delta.std()) - 0.2) < 0.01 and abs(float(delta.mean())) < 0.01
    torch.testing.assert_close(delta[0], params[0]["noise"])
    assert not torch.allclose(delta[0], delta[1])


def test_none_recipe_is_a_plain_resize() -> None:
    images = smooth_images(size=32)
    views = ViewGenerator("none", 16)(images, gen())
    ref = F.interpolate(as_float(images), size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(views[0], ref)
    torch.testing.assert_close(views[1], ref)


def test_byol_views_are_asymmetric() -> None:
    _, _, params = make(smooth_images(n=200, size=8), "byol", size=8)
    assert params[0]["blur"].all() and not params[0]["solarize"].any()
    assert 0.02 < params[1]["blur"].float().mean() < 0.2
    assert 0.1 < params[1]["solarize"].float().mean() < 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_views_match_shapes_and_replay() -> None:
    images = smooth_images().cuda()
    vg = ViewGenerator("byol", S, 2)
    views, params = vg(images, torch.Generator(device="cuda").manual_seed(0), return_params=True)
    assert views.device.type == "cuda" and views.shape == (2, N, 3, S, S)
    assert torch.equal(vg.replay(images, params), views)


def test_save_view_grid_writes_png(tmp_path) -> None:
    from PIL import Image

    images = smooth_images(n=5, size=20)
    views = ViewGenerator("simclr", S, 3)(images, gen())
    path = save_view_grid(images, views, tmp_path / "sub" / "grid.png", n=4)
    with Image.open(path) as im:
        assert im.size == (4 * (S + 2) + 2, 4 * (S + 2) + 2)
    gray = ViewGenerator("simclr", S, 2)(smooth_images(n=3, c=1), gen())
    assert save_view_grid(smooth_images(n=3, c=1), gray, tmp_path / "g.png").exists()
