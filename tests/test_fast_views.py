"""Fast views (Recipe.fast with a crop or flip): crop, flip, resize, blur and the colour map as
two GEMMs per view (resample.separable_views). References are written from the definitions:
cut the box out, F.interpolate it, flip, blur by a 2-D convolution with torchvision's kernel
and reflect padding, apply the colour matrix channel by channel, clamp."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ssl_lab.data import augment as A
from ssl_lab.data import resample as R
from ssl_lab.data.views import ViewGenerator, get_recipe
from ssl_lab.runtime import keep_freed_memory

FP32 = torch.float32


def photo_like(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, size, size, 3) with smooth structure and some sharp noise."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(size, size), mode="bilinear")
    x = (0.85 * low + 0.15 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def reference_view(image: torch.Tensor, box: list[int], flip: bool, size: int,
                   sigma: float | None = None, ksize: int = 0,
                   matrix: torch.Tensor | None = None, shift: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """One view (C, S, S) of one uint8 (H, W, C) image, op by op in the fast order."""
    top, left, h, w = box
    x = image.permute(2, 0, 1).float()[None, :, top:top + h, left:left + w] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if flip:
        x = x.flip(-1)
    if sigma is not None:
        pos = torch.arange(ksize) - ksize // 2
        k1 = torch.exp(-0.5 * (pos / sigma) ** 2)
        k1 = k1 / k1.sum()
        k2 = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, ksize, ksize)
        x = F.conv2d(F.pad(x, (ksize // 2,) * 4, mode="reflect"), k2, groups=x.shape[1])
    x = x[0]
    if matrix is not None:
        x = torch.einsum("dc,chw->dhw", matrix, x) + shift.view(-1, 1, 1)
    return x.clamp(0, 1)


def random_boxes(m: int, height: int, width: int, seed: int) -> torch.Tensor:
    u = torch.rand(m, 2 * A.N_CROP_TRIES + 2, generator=torch.Generator().manual_seed(seed))
    return A.sample_crop_boxes(u, height, width, (0.08, 1.0), (3 / 4, 4 / 3))


def src_of(images: torch.Tensor, dtype: torch.dtype = FP32) -> torch.Tensor:
    n, h, w, c = images.shape
    return images.reshape(n, h, w * c).to(dtype)


# --- the matrices --------------------------------------------------------------------------------

@pytest.mark.parametrize("out_size", [12, 40])  # crops that shrink and crops that grow
def test_bilinear_matrices_equal_grid_sample_crops(out_size: int) -> None:
    images = photo_like(16, 32)
    boxes = random_boxes(16, 32, 32, seed=1)
    flip = torch.arange(16) % 3 == 0
    rows, cols = R.resample_matrices(boxes, flip, 32, 32, out_size, antialias=False)
    x = images.permute(0, 3, 1, 2).float() / 255
    ours = torch.matmul(torch.matmul(rows[:, None], x), cols.transpose(1, 2)[:, None])
    ref = A.crop_flip_resize(x, boxes, flip, out_size)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    assert torch.allclose(rows.sum(-1), torch.ones(())) and (rows >= 0).all()


def test_blur_folds_into_the_matrices() -> None:
    images = photo_like(6, 30)
    boxes = random_boxes(6, 30, 30, seed=2)
    flip = torch.tensor([True, False, True, False, False, True])
    sigma = torch.tensor([0.3, 1.0, 2.0, 1.5, 0.7, 1.9])
    mask = torch.tensor([True, True, True, False, True, True])
    k = 5
    rows, cols = R.resample_matrices(boxes, flip, 30, 30, 16, False,
                                     A.gauss_kernels(sigma, mask, k))
    ours = torch.matmul(torch.matmul(rows[:, None], images.permute(0, 3, 1, 2).float() / 255),
                        cols.transpose(1, 2)[:, None])
    for i in range(6):
        ref = reference_view(images[i], boxes[i].tolist(), bool(flip[i]), 16,
                             float(sigma[i]) if mask[i] else None, k)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_blur_wider_than_the_view_repeats_edge_indices() -> None:
    """A 3-px view with a 9-tap blur: the reach exceeds the view, as `gaussian_blur` handles."""
    images = photo_like(2, 12)
    boxes, flip = torch.tensor([[0, 0, 12, 12], [2, 3, 6, 7]]), torch.tensor([False, True])
    sigma, mask = torch.tensor([1.5, 0.8]), torch.tensor([True, True])
    rows, cols = R.resample_matrices(boxes, flip, 12, 12, 3, False, A.gauss_kernels(sigma, mask, 9))
    x = images.permute(0, 3, 1, 2).float() / 255
    ours = torch.matmul(torch.matmul(rows[:, None], x), cols.transpose(1, 2)[:, None])
    crops = A.crop_flip_resize(x, boxes, flip, 3)
    ref = A.gaussian_blur(crops.clone(), sigma, mask, 9, torch.empty_like(crops))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


# --- separable_views -----------------------------------------------------------------------------

def test_separable_views_equal_the_ops_one_by_one_in_fp32() -> None:
    n, v, size, k = 5, 3, 20, 3
    images = photo_like(n, 26)
    m = n * v  # image-major rows: view j of image i is row i * v + j
    boxes = random_boxes(m, 26, 26, seed=3)
    flip = torch.arange(m) % 2 == 1
    g = torch.Generator().manual_seed(4)
    sigma, mask = 0.1 + 1.9 * torch.rand(m, generator=g), torch.rand(m, generator=g) < 0.6
    matrix = torch.eye(3) + 0.3 * torch.randn(m, 3, 3, generator=g)
    shift = 0.2 * torch.randn(m, 3, 1, generator=g)
    rows, cols = R.resample_matrices(boxes, flip, 26, 26, size, False,
                                     A.gauss_kernels(sigma, mask, k))
    views = R.separable_views(src_of(images), rows, cols, matrix, shift, 3)
    assert views.shape == (v, n, 3, size, size) and views.dtype == FP32
    for i in range(n):
        for j in range(v):
            r = i * v + j
            ref = reference_view(images[i], boxes[r].tolist(), bool(flip[r]), size,
                                 float(sigma[r]) if mask[r] else None, k, matrix[r], shift[r])
            torch.testing.assert_close(views[j, i], ref, atol=1e-5, rtol=0)
    assert (views == 0).any() and (views == 1).any()  # the clamp bound somewhere: it was tested


def test_crop_means_are_the_means_of_the_views() -> None:
    images = photo_like(4, 24)
    boxes = random_boxes(8, 24, 24, seed=5)
    rows, cols = R.resample_matrices(boxes, torch.zeros(8, dtype=torch.bool), 24, 24, 16, False)
    views = R.separable_views(src_of(images), rows, cols, None, None, 3)  # (V, N, ...)
    means = views.transpose(0, 1).reshape(8, 3, -1).mean(-1, keepdim=True)
    torch.testing.assert_close(R.crop_means(src_of(images), rows, cols), means, atol=1e-6, rtol=0)


def test_separable_views_in_bf16_are_the_fp32_views_to_bf16_precision() -> None:
    images = photo_like(8, 32)
    boxes = random_boxes(16, 32, 32, seed=6)
    rows, cols = R.resample_matrices(boxes, torch.arange(16) % 2 == 0, 32, 32, 32, False)
    matrix, shift = 1.2 * torch.eye(3).expand(16, 3, 3), torch.full((16, 3, 1), -0.05)
    exact = R.separable_views(src_of(images), rows, cols, matrix, shift, 3)
    low = R.separable_views(src_of(images, torch.bfloat16), rows, cols, matrix, shift, 3)
    # bf16 roundings (relative 2^-9 each) of the rows, the matrix and each GEMM's output, on
    # values up to ~1.2 (here 1.2 itself is 1.203 in bf16): a few 1/255 at most
    assert (low - exact).abs().max() < 2e-2 and (low - exact).abs().mean() < 4e-3
    assert low.dtype == FP32 and low.min() >= 0 and low.max() <= 1


# --- through ViewGenerator -----------------------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["fp32-gemms", "bf16-gemms"])
def gemm_bf16(request, monkeypatch) -> bool:
    monkeypatch.setattr(A, "native_bf16_matmul", lambda device: request.param)
    return request.param


def test_fast_crops_flips_and_blurs_equal_the_exact_views(gemm_bf16: bool) -> None:
    """Without colour ops nothing is clamped, so the fast order (blur inside the GEMMs) and the
    exact one (grid_sample, then the blur) make the same views, up to the GEMMs' precision."""
    images = photo_like(24, 100)
    recipe = replace(get_recipe("simclr", size=96), jitter_p=0.0, grayscale_p=0.0)
    assert recipe.fast and recipe.blur_p == 0.5
    fast_vg = ViewGenerator(recipe, 96, 2)
    fast, params = fast_vg(images, torch.Generator().manual_seed(0), return_params=True)
    exact = ViewGenerator(replace(recipe, fast=False), 96, 2).replay(images, params)
    assert 0 < params[0]["blur"].sum() < 24 and params[0]["flip"].any()
    err = (fast - exact).abs()
    if gemm_bf16:
        assert err.max() < 1.2e-2 and err.mean() < 2e-3
    else:
        assert err.max() < 2e-5
    assert torch.equal(fast_vg.replay(images, params), fast)


def test_fast_colour_matches_exact_colour_where_no_clamp_binds(gemm_bf16: bool) -> None:
    """Mid-grey images and mild jitter: no value leaves [0, 1], so the one colour map of the
    fast views is the exact chain; contrast's mean is the blurred crop's there (blur first),
    which differs from the exact recipe's unblurred mean only by the reflect padding."""
    g = torch.Generator().manual_seed(7)
    images = (100 + 56 * torch.rand(16, 70, 70, 3, generator=g)).to(torch.uint8)
    recipe = replace(get_recipe("vicreg", size=72, fast=True), brightness=0.2, contrast=0.2,
                     saturation=0.2, hue=0.05, solarize_p=0.0)
    fast, params = ViewGenerator(recipe, 72, 2)(images, torch.Generator().manual_seed(1),
                                                return_params=True)
    exact = ViewGenerator(replace(recipe, fast=False), 72, 2).replay(images, params)
    assert (exact - exact.mean((-1, -2), keepdim=True)).abs().amax() > 0.05  # not flat
    assert params[0]["jitter"].float().mean() > 0.5 and params[0]["grayscale"].any()
    err = (fast - exact).abs()
    assert err.max() < (1.5e-2 if gemm_bf16 else 2e-3) and err.mean() < 2e-3


def test_fast_views_are_random_per_sample_and_replay_exactly(gemm_bf16: bool) -> None:
    images = photo_like(1, 96).expand(6, -1, -1, -1).contiguous()  # one image six times
    vg = ViewGenerator("byol", 96, 3)
    views, params = vg(images, torch.Generator().manual_seed(3), return_params=True)
    assert vg.recipe.fast and views.shape == (3, 6, 3, 96, 96) and views.is_contiguous()
    flat = views.reshape(18, -1)
    dist = torch.cdist(flat, flat).fill_diagonal_(float("inf"))
    assert dist.min() > 1.0  # every view differs from every other
    assert views.min() >= 0 and views.max() <= 1
    assert torch.equal(vg.replay(images, params), views)
    again = vg(images, torch.Generator().manual_seed(3))
    assert torch.equal(again, views)  # same seed, same views: scratch buffers carry nothing over


def test_fast_views_of_grey_images_and_antialiased_crops(gemm_bf16: bool) -> None:
    grey = photo_like(4, 80)[..., :1].contiguous()
    vg = ViewGenerator("simclr", 72, 2)
    views = vg(grey, torch.Generator().manual_seed(0))
    assert views.shape == (2, 4, 1, 72, 72) and views.min() >= 0 and views.max() <= 1
    images = photo_like(4, 120)
    recipe = replace(get_recipe("simclr", size=72, antialias=True), jitter_p=0.0,
                     grayscale_p=0.0, blur_p=0.0)
    fast, params = ViewGenerator(recipe, 72, 2)(images, torch.Generator().manual_seed(0),
                                                return_params=True)
    exact = ViewGenerator(replace(recipe, fast=False), 72, 2).replay(images, params)
    assert (fast - exact).abs().max() < (1.2e-2 if gemm_bf16 else 2e-5)


def test_keep_freed_memory_applies_on_linux_glibc() -> None:
    import platform
    import sys

    expect = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expect
