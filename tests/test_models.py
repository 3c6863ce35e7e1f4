"""Backbones and projectors: declared widths, layer names, last_width, torchvision layout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ssl_lab.errors import UserError
from ssl_lab.models import BACKBONES, Projector, build_backbone, parse_projector_spec

RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
TINY_VIT = dict(patch_size=8, depth=2, dim=32, heads=2, image_size=16)

RESNET_CASES = [
    (name, stem, width, lw)
    for name in RESNET_BLOCKS
    for stem in ("cifar", "imagenet")
    for width in (0.125, 0.25)
    for lw in (None, 16, 96)
]
VIT_CASES = [
    (name, kw, lw, pool)
    for name, kw in (("vit", dict(width=0.125)), ("vit", TINY_VIT))
    for lw in (None, 40)
    for pool in ("cls", "mean")
]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread avoids spin-waiting on a busy 2-core machine (~10x faster here);
    # function-scoped so it runs after conftest's autouse fixtures, which set the thread count
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image(model: nn.Module, n: int = 2) -> torch.Tensor:
    cfg = model.config
    size = cfg["image_size"] if cfg["name"].startswith("vit") else (
        32 if cfg["stem"] == "imagenet" else 16)
    return torch.randn(n, cfg["in_chans"], size, size)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_declared_widths(model: nn.Module, expected_names: list[str]) -> None:
    model.eval()
    x = image(model)
    assert model.layer_names == expected_names == list(model.feature_dims)
    feats = model.features(x, model.layer_names)
    assert list(feats) == expected_names
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        k: (2, d) for k, d in model.feature_dims.items()}
    assert model.embed_dim == model.feature_dims["backbone"]
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, feats["backbone"])


def check_config_rebuilds(model: nn.Module) -> None:
    cfg = json.loads(json.dumps(model.config))  # must be JSON-serialisable
    twin = build_backbone(**cfg)
    assert shapes(twin) == shapes(model)
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    x = image(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


@pytest.mark.parametrize("name,stem,width,lw", RESNET_CASES)
def test_resnet_declared_widths_and_config(name, stem, width, lw):
    model = build_backbone(name, width=width, last_width=lw, stem=stem)
    check_declared_widths(model, ["stage1", "stage2", "stage3", "backbone"])
    expansion = 4 if name == "resnet50" else 1
    planes = [round(b * width) for b in (64, 128, 256, 512)]
    assert model.embed_dim == (lw if lw is not None else planes[3] * expansion)
    assert model.feature_dims["stage1"] == planes[0] * expansion
    assert tuple(model.forward_features(image(model)).shape[:2]) == (2, model.embed_dim)
    check_config_rebuilds(model)


def test_resnet_width_rounding():
    assert list(build_backbone("resnet18", width=0.25).feature_dims.values()) == [16, 32, 64, 128]
    assert build_backbone("resnet18", width=0.001).feature_dims["stage1"] == 1


@pytest.mark.parametrize("name,kw,lw,pool", VIT_CASES)
def test_vit_declared_widths_and_config(name, kw, lw, pool):
    model = build_backbone(name, last_width=lw, pool=pool, **kw)
    depth = model.config["depth"]
    check_declared_widths(model, [f"block{i + 1}" for i in range(depth)] + ["backbone"])
    if lw is not None:
        assert model.embed_dim == lw and model.feature_dims[f"block{depth}"] == lw
    tokens = model.forward_features(image(model))
    n_tokens = 1 + (model.config["image_size"] // model.config["patch_size"]) ** 2
    assert tuple(tokens.shape) == (2, n_tokens, model.embed_dim)
    check_config_rebuilds(model)


def arch(model: nn.Module) -> tuple[int, int, int, int]:
    cfg = model.config
    return cfg["patch_size"], cfg["dim"], cfg["depth"], cfg["heads"]


def test_vit_presets_overrides_and_width_rounding():
    assert arch(build_backbone("vit")) == (4, 192, 6, 3)  # the CPU toy
    tiny = build_backbone("vit_tiny", image_size=32)
    assert arch(tiny) == (16, 192, 12, 3) and len(tiny.blocks) == 12
    assert tiny.patch_embed.proj.kernel_size == (16, 16) and tiny.pos_embed.shape[1] == 1 + 4
    assert build_backbone("vit").embed_dim == 192
    assert build_backbone("vit", width=0.1).embed_dim == 18  # 19.2 -> multiple of 3
    small = build_backbone("vit_small", image_size=32, patch_size=8, depth=2, dim=48, heads=4,
                           pool="mean")
    assert arch(small) == (8, 48, 2, 4) and small.pool == "mean"
    assert small.layer_names == ["block1", "block2", "backbone"] and small.embed_dim == 48


@pytest.mark.parametrize("name,expected", [("vit_small", 21_665_664), ("vit_base", 85_798_656)])
def test_vit_parameter_counts_match_timm_without_head(name, expected):
    # timm's vit_{small,base}_patch16_224 minus the 1000-class head (weight + bias)
    model = build_backbone(name, image_size=224)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert tuple(model.pos_embed.shape[:2]) == (1, 197)


def differing_keys(a: nn.Module, b: nn.Module) -> set[str]:
    sa, sb = shapes(a), shapes(b)
    return {k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)}


@pytest.mark.parametrize("name", list(RESNET_BLOCKS))
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("lw", [16, 96])
def test_resnet_last_width_changes_only_last_block(name, stem, lw):
    base = build_backbone(name, width=0.125, stem=stem)
    wide = build_backbone(name, width=0.125, stem=stem, last_width=lw)
    last = f"layer4.{RESNET_BLOCKS[name][3] - 1}."
    diff = differing_keys(base, wide)
    assert diff and all(k.startswith(last) for k in diff), sorted(diff)
    # the block's input (its stage's standard width) differs from lw: projection shortcut
    assert f"{last}downsample.0.weight" in shapes(wide)
    assert shapes(wide)[f"{last}downsample.0.weight"][0] == lw
    out_conv = "conv3" if name == "resnet50" else "conv2"
    assert shapes(wide)[f"{last}{out_conv}.weight"][0] == lw


def test_resnet_last_width_equal_to_standard_is_identity_change():
    base = build_backbone("resnet18", width=0.125)
    same = build_backbone("resnet18", width=0.125, last_width=base.embed_dim)
    assert differing_keys(base, same) == set()


@pytest.mark.parametrize("name,kw", [("vit", dict(width=0.125)), ("vit", TINY_VIT)])
def test_vit_last_width_changes_only_last_block(name, kw):
    base = build_backbone(name, **kw)
    wide = build_backbone(name, last_width=40, **kw)
    last = f"blocks.{base.config['depth'] - 1}."
    diff = differing_keys(base, wide)
    assert diff and all(k.startswith((last, "norm.")) for k in diff), sorted(diff)
    assert shapes(wide)[f"{last}mlp.fc2.weight"][0] == 40
    assert shapes(wide)[f"{last}res_proj.weight"] == (40, base.embed_dim)
    assert shapes(wide)["norm.weight"] == (40,)


def torchvision_resnet_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The state-dict layout of torchvision.models.<name>() without fc, written out by hand."""
    bottleneck = name == "resnet50"
    out: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{k}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin = 64
    for s, (n, planes) in enumerate(zip(RESNET_BLOCKS[name], (64, 128, 256, 512),
                                        strict=True), start=1):
        cout = planes * 4 if bottleneck else planes
        for b in range(n):
            p = f"layer{s}.{b}."
            if bottleneck:
                out[p + "conv1.weight"] = (planes, cin, 1, 1)
                out[p + "conv2.weight"] = (planes, planes, 3, 3)
                out[p + "conv3.weight"] = (cout, planes, 1, 1)
                bn(p + "bn3", cout)
            else:
                out[p + "conv1.weight"] = (planes, cin, 3, 3)
                out[p + "conv2.weight"] = (planes, planes, 3, 3)
            bn(p + "bn1", planes)
            bn(p + "bn2", planes)
            if b == 0 and (s > 1 or cin != cout):
                out[p + "downsample.0.weight"] = (cout, cin, 1, 1)
                bn(p + "downsample.1", cout)
            cin = cout
    return out


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_strict(name):
    expected = torchvision_resnet_shapes(name)
    model = build_backbone(name, stem="imagenet")
    assert shapes(model) == expected
    state = {k: torch.zeros(s, dtype=torch.long) if k.endswith("num_batches_tracked")
             else torch.randn(s) for k, s in expected.items()}
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(model.layer4[-1].bn2.weight, state["layer4.2.bn2.weight"]
                               if name == "resnet50" else state["layer4.1.bn2.weight"])


def count_calls(modules: dict[str, nn.Module]) -> dict[str, int]:
    counts = dict.fromkeys(modules, 0)
    for key, m in modules.items():
        m.register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
    return counts


def test_resnet_features_stop_early():
    model = build_backbone("resnet18", width=0.125).eval()
    counts = count_calls({f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)})
    model.features(image(model), ["stage2", "stage1"])
    assert counts == {"layer1": 1, "layer2": 1, "layer3": 0, "layer4": 0}
    model.features(image(model), ["backbone"])
    assert counts["layer4"] == 1
    assert model.features(image(model), []) == {}


def test_vit_features_stop_early():
    model = build_backbone("vit", **dict(TINY_VIT, depth=3)).eval()
    counts = count_calls({"b0": model.blocks[0], "b1": model.blocks[1], "b2": model.blocks[2],
                          "norm": model.norm})
    feats = model.features(image(model), ["block1"])
    assert list(feats) == ["block1"]
    assert counts == {"b0": 1, "b1": 0, "b2": 0, "norm": 0}


def test_unknown_names_are_user_errors():
    model = build_backbone("resnet18", width=0.125)
    with pytest.raises(UserError, match="stage1, stage2, stage3, backbone"):
        model.features(image(model), ["stage4"])
    with pytest.raises(UserError, match="resnet18"):
        build_backbone("resnet101")
    with pytest.raises(UserError, match="patch_size"):
        build_backbone("resnet18", patch_size=4)
    with pytest.raises(UserError, match="cifar, small, imagenet"):
        build_backbone("resnet18", stem="tiny")
    with pytest.raises(UserError, match="width"):
        build_backbone("resnet18", width=0)
    with pytest.raises(UserError, match="last_width"):
        build_backbone("resnet18", last_width=0)
    with pytest.raises(UserError, match="image_size 30 is not divisible by patch_size 4"):
        build_backbone("vit", image_size=30)
    with pytest.raises(UserError, match="image_size 40 is not divisible by patch_size 16"):
        build_backbone("vit_base", image_size=40)
    with pytest.raises(UserError, match="dim 384 is not divisible by heads 5"):
        build_backbone("vit_small", image_size=32, heads=5)
    with pytest.raises(UserError, match="cls, mean"):
        build_backbone("vit", pool="max")
    vit = build_backbone("vit", **TINY_VIT)
    with pytest.raises(UserError, match="block1, block2, backbone"):
        vit.features(image(vit), ["block3"])
    with pytest.raises(UserError, match="image_size=8"):
        vit(torch.randn(1, 3, 8, 8))
    assert set(BACKBONES) == {"resnet18", "resnet34", "resnet50", "vit", "vit_tiny", "vit_small",
                              "vit_base"}


def test_projector_spec_grammar():
    mlp = parse_projector_spec("512-512-128")
    assert [(s.width, s.bias, s.bn, s.relu) for s in mlp] == [
        (512, True, True, True), (512, True, True, True), (128, True, False, False)]
    fastssl = parse_projector_spec("64n-64")
    assert [(s.width, s.bias, s.bn, s.relu) for s in fastssl] == [
        (64, False, True, True), (64, True, False, False)]
    assert parse_projector_spec("512-128b")[-1].bn and parse_projector_spec("512-128b")[-1].relu
    r = parse_projector_spec("256r-32")[0]
    assert (r.bn, r.relu) == (False, True)
    assert parse_projector_spec("256l-32")[0].relu is False
    assert len(parse_projector_spec("128")) == 1
    for spec in ("", "none", "None", " none "):
        assert parse_projector_spec(spec) == []
    for bad in ("512-abc", "512--128", "0-128", "512x", "512bb", "512bl", "-", "512-", "1.5"):
        with pytest.raises(UserError, match="projector spec"):
            parse_projector_spec(bad)


def test_projector_modules_and_layers():
    h = torch.randn(4, 24)
    fastssl = Projector(24, "64n-64")
    lin1, bn, relu = fastssl.blocks[0]
    assert lin1.bias is None and isinstance(bn, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)
    assert len(fastssl.blocks[1]) == 1 and fastssl.blocks[1][0].bias is not None
    proj = Projector(24, "32-16-8").eval()
    assert proj.layer_names == ["proj1", "proj2", "proj3"] and proj.out_dim == 8
    layers = proj.forward_layers(h)
    assert {k: tuple(v.shape) for k, v in layers.items()} == {
        k: (4, d) for k, d in proj.feature_dims.items()}
    assert (layers["proj1"] >= 0).all()  # after the activation
    torch.testing.assert_close(layers["proj3"], proj(h))
    counts = count_calls({"b2": proj.blocks[2]})
    assert list(proj.forward_layers(h, ["proj1"])) == ["proj1"] and counts["b2"] == 0
    with pytest.raises(UserError, match="proj1, proj2, proj3"):
        proj.forward_layers(h, ["proj4"])
    linear = Projector(24, "128")
    assert len(linear.blocks) == 1 and isinstance(linear.blocks[0][0], nn.Linear)
    ident = Projector(24, "none")
    assert ident.layer_names == [] and ident.out_dim == 24 and ident(h) is h
    assert ident.forward_layers(h) == {}


@pytest.mark.parametrize("name,kw", [("resnet18", dict(width=0.125, zero_init_residual=False)),
                                     ("resnet50", dict(width=0.125, last_width=48)),
                                     ("vit", dict(TINY_VIT, last_width=40))])
def test_gradients_flow(name, kw):
    model = build_backbone(name, **kw)
    proj = Projector(model.embed_dim, "32-16")
    loss = proj(model(image(model, n=4))).pow(2).mean()
    loss.backward()
    for pname, p in [*model.named_parameters(), *proj.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if not kw.get("zero_init_residual", True) or name == "vit":
        assert all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name,kw", [("resnet18", dict(width=0.125, last_width=24)),
                                     ("resnet50", dict(width=0.125, stem="imagenet")),
                                     ("vit", TINY_VIT)])
def test_channels_last_bf16_autocast(name, kw):
    model = build_backbone(name, **kw).to(memory_format=torch.channels_last)
    x = image(model).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        feats = model.features(x, model.layer_names)
    assert tuple(out.shape) == (2, model.embed_dim) and torch.isfinite(out.float()).all()
    assert {k: v.shape[1] for k, v in feats.items()} == model.feature_dims


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("size", [2, 7])
def test_resnet_pool_is_the_spatial_mean_in_values_and_gradients(dtype, memory_format, size):
    from ssl_lab.models.resnet import pool

    x = (torch.randn(5, 6, size, size) * 3).to(dtype).to(memory_format=memory_format)
    g = torch.randn(5, 6).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = pool(a), b.mean(dim=(2, 3))
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
