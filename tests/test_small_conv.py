"""SmallMapConv2d: nn.Conv2d's values and gradients, computed as one matmul on tiny maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lab.models import build_backbone
from ssl_lab.models.small_conv import SmallMapConv2d, dense_conv2d


def _reference_conv(x, weight, bias, stride, padding):
    """The textbook definition, one output pixel at a time (independent of F.conv2d too)."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    oh, ow = (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1
    out = torch.zeros(n, o, oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride[0]: i * stride[0] + kh, j * stride[1]: j * stride[1] + kw]
            out[:, :, i, j] = torch.einsum("nckl,ockl->no", patch, weight)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


CASES = [  # (kernel, stride, padding, (h, w))
    (3, 1, 1, (2, 2)), (3, 1, 1, (4, 4)), (3, 2, 1, (4, 4)), (3, 2, 1, (3, 3)), (3, 1, 1, (1, 1)),
    (3, 1, 0, (4, 4)), (3, 1, 1, (2, 4)), (1, 1, 0, (2, 2)), (1, 2, 0, (4, 4)), (2, 2, 0, (4, 4)),
]


@pytest.mark.parametrize("kernel,stride,padding,size", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_conv_equals_the_definition_values_and_gradients(kernel, stride, padding, size, bias,
                                                                channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(7, 5, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    s, p = (stride, stride), (padding, padding)
    got = dense_conv2d(x, w, b, s, p)
    want = _reference_conv(x, w, b, s, p)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(want)
    grads = torch.autograd.grad((got * g).sum(), [x, w, *([b] if bias else [])])
    refs = torch.autograd.grad((want * g).sum(), [x, w, *([b] if bias else [])])
    for a, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
    # layouts the rest of a channels_last network expects from the tap-matrix path: output
    # channels_last, the input's gradient in the input's layout, the weight's gradient contiguous
    if channels_last and kernel > 1 and got.shape[-2:] != (1, 1):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert grads[1].is_contiguous()


def test_module_is_a_conv2d_with_its_state_dict_and_falls_back_where_dense_loses(monkeypatch):
    torch.manual_seed(0)
    small = SmallMapConv2d(4, 6, 3, padding=1, bias=False)
    plain = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    plain.load_state_dict(small.state_dict(), strict=True)
    assert isinstance(small, nn.Conv2d) and small.state_dict().keys() == plain.state_dict().keys()
    calls = []
    monkeypatch.setattr("ssl_lab.models.small_conv.dense_conv2d",
                        lambda *a: calls.append(a[0].shape) or dense_conv2d(*a))
    big = torch.randn(2, 4, 5, 5)
    assert torch.equal(small(big), plain(big)) and not calls  # 25 px > 16: nn.Conv2d's path
    wide = SmallMapConv2d(2048, 2048, 3, padding=1, bias=False, device="meta")  # 8192 x 8192
    assert not wide.uses_dense(torch.empty(1, 2048, 2, 2, device="meta"))
    assert SmallMapConv2d(64, 128, 1, stride=2).uses_dense(torch.empty(1, 64, 4, 4))
    same_size = torch.randn(2, 4, 4, 4)  # 4x4 -> 4x4: the dense matrix would be 61 % zeros
    assert torch.equal(small(same_size), plain(same_size)) and not calls
    tiny = torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(small(tiny), plain(tiny), rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([2, 4, 2, 2])]
    monkeypatch.setattr(SmallMapConv2d, "dense", False)
    assert torch.equal(small(tiny), plain(tiny)) and len(calls) == 1


def test_resnet_with_dense_small_convs_matches_plain_convs_under_bf16_autocast(monkeypatch):
    """The default backbone on 28 px images (its stage-3/4 maps are 4x4 and 2x2): same outputs
    in fp32, and bf16 autocast within bf16 rounding of the fp32 result on both paths."""
    torch.manual_seed(0)
    net = build_backbone("resnet18", width=0.25, last_width=512, stem="small", in_chans=1).eval()
    x = torch.randn(8, 1, 28, 28)
    dense = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_bf16 = net(x).float()
    monkeypatch.setattr(SmallMapConv2d, "dense", False)
    plain = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_bf16 = net(x).float()
    torch.testing.assert_close(dense, plain, rtol=1e-4, atol=1e-4)
    scale = plain.abs().max()
    assert (dense_bf16 - plain).abs().max() < 0.05 * scale
    assert (plain_bf16 - plain).abs().max() < 0.05 * scale
