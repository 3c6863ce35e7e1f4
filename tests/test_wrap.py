"""ssl_lab.models.from_module: any nn.Module as a backbone, and load_factory."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import ssl_lab
from ssl_lab.errors import UserError
from ssl_lab.models import (
    IMAGENET_MEAN,
    Backbone,
    ModuleBackbone,
    Projector,
    from_module,
    load_factory,
)

LAYERS = {"c1": "conv1", "c2": "conv2", "emb": "fc"}


class SmallCNN(nn.Module):
    """32x32 inputs: conv (8 ch) -> conv block (16 ch, 16x16) -> flatten -> fc (12) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                   nn.ReLU())
        self.pool = nn.AvgPool2d(4)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.head(torch.relu(self.fc(self.flat(self.pool(x)))))


class PairOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
        return "tag", x * 2, x


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": x}


class Tokens(nn.Module):
    """A tiny token model: patch embed (6 ch, 4x4 patches) + CLS -> Linear mixing: (N, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.mix = nn.Linear(6, 5)
        self.pair = PairOut()
        self.odd = DictOut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        self.odd(t)
        return self.pair(self.mix(t))[2]


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cnn_widths_features_and_config():
    torch.manual_seed(0)
    net = SmallCNN()
    b = ssl_lab.models.from_module(net, layers=LAYERS, input_size=32)
    assert isinstance(b, ModuleBackbone) and isinstance(b, Backbone)
    assert b.feature_dims == {"c1": 8, "c2": 16, "backbone": 12}
    assert b.layer_names == ["c1", "c2", "backbone"] and b.embed_dim == 12
    assert (b.mean, b.std, b.input_size, b.in_chans, b.token_pool) == (
        IMAGENET_MEAN, (0.229, 0.224, 0.225), 32, 3, "cls")
    assert b.supports_last_width is False and ssl_lab.models.ResNet.supports_last_width
    cfg = json.loads(json.dumps(b.config))
    assert cfg == b.config and cfg["name"] == "module"
    assert cfg["module_class"] == f"{SmallCNN.__module__}.SmallCNN"
    assert cfg["layers"] == {"c1": "conv1", "c2": "conv2", "backbone": "fc"}
    assert cfg["feature_dims"] == b.feature_dims and cfg["mean"] == list(IMAGENET_MEAN)

    b.eval()
    x = torch.randn(3, 3, 32, 32)
    feats = b.features(x, ["backbone", "c1"])
    assert list(feats) == ["backbone", "c1"]  # only the requested ones, in the asked order
    with torch.no_grad():
        c1 = net.conv1(x)
        emb = net.fc(net.flat(net.pool(net.conv2(torch.relu(c1)))))
    torch.testing.assert_close(feats["c1"], c1.mean(dim=(2, 3)))  # 4-D: global average pool
    torch.testing.assert_close(feats["backbone"], emb)  # 2-D: as is
    torch.testing.assert_close(b(x), emb)
    assert tuple(b.features(x, ["c2"])["c2"].shape) == (3, 16)
    assert b.features(x, []) == {}
    with pytest.raises(UserError, match="valid layers: c1, c2, backbone"):
        b.features(x, ["emb"])


def test_features_stop_after_the_deepest_requested_layer_and_leave_no_hooks():
    net = SmallCNN()
    b = from_module(net, LAYERS)
    fc_calls, head_calls = count_calls(net.fc), count_calls(net.head)
    b.features(torch.randn(2, 3, 32, 32), ["c1"])
    assert (fc_calls[0], head_calls[0]) == (0, 0)
    assert tuple(b(torch.randn(2, 3, 32, 32)).shape) == (2, 12)
    assert (fc_calls[0], head_calls[0]) == (1, 0)  # the classifier head never runs
    assert all(not m._forward_hooks or m in (net.fc, net.head) for m in net.modules())
    assert tuple(net(torch.randn(2, 3, 32, 32)).shape) == (2, 10)  # the net itself is intact


def test_backbone_naming_rules():
    net = SmallCNN()
    named = from_module(net, {"backbone": "fc", "c1": "conv1"})
    assert named.layer_names == ["c1", "backbone"]
    assert named.config["layers"] == {"c1": "conv1", "backbone": "fc"}
    last = from_module(net, {"c2": "conv2"})
    assert last.feature_dims == {"backbone": 16}
    for bad in ({}, {"proj1": "fc"}, {"1st": "fc"}, {"a-b": "fc"}):
        with pytest.raises(UserError, match="layer|layers"):
            from_module(net, bad)


@pytest.mark.parametrize("token_pool", ["cls", "mean"])
def test_token_outputs_are_pooled_by_cls_or_mean(token_pool):
    torch.manual_seed(0)
    net = Tokens()
    b = from_module(net, {"emb": "embed", "mixed": "mix", "backbone": "pair"}, input_size=16,
                    token_pool=token_pool)
    assert b.feature_dims == {"emb": 6, "mixed": 5, "backbone": 5}
    x = torch.rand(4, 3, 16, 16)
    tokens = net(x)  # (N, 1 + 16, 5)
    assert tuple(tokens.shape) == (4, 17, 5)
    expected = tokens[:, 0] if token_pool == "cls" else tokens.mean(dim=1)
    feats = b.features(x, b.layer_names)
    torch.testing.assert_close(feats["mixed"], expected)
    torch.testing.assert_close(feats["backbone"], 2 * expected)  # the tuple's first tensor
    torch.testing.assert_close(b.forward_features(x), 2 * tokens)  # raw, unpooled
    with pytest.raises(UserError, match="layer 'd'.*'odd'.*returns dict"):
        from_module(net, {"d": "odd", "backbone": "mix"}, input_size=16)


def test_unknown_path_and_bad_input_size_are_user_errors():
    net = SmallCNN()
    with pytest.raises(UserError, match=r"no sub-module 'conv3'.*conv1, conv2, pool, flat, fc"):
        from_module(net, {"x": "conv3"})
    with pytest.raises(UserError, match=r"no sub-module 'conv2\.7'.*conv2\.0, conv2\.1, conv2\.2"):
        from_module(net, {"x": "conv2.7"})
    with pytest.raises(UserError, match=r"'conv2\.0' has no sub-modules, use it itself"):
        from_module(net, {"x": "conv2.0.weight"})
    with pytest.raises(UserError, match=r"input_size=20 / in_chans=3 probably do not match"):
        from_module(net, LAYERS, input_size=20)
    with pytest.raises(UserError, match="in_chans=1 probably do not match"):
        from_module(net, LAYERS, in_chans=1)
    with pytest.raises(UserError, match="token_pool"):
        from_module(net, LAYERS, token_pool="max")
    with pytest.raises(UserError, match="'spare'.*did not run in SmallCNN.forward"):
        net.spare = nn.Linear(2, 2)  # registered but never called
        from_module(net, {"x": "spare", "backbone": "fc"})


def test_mean_std_defaults_and_checks():
    gray = from_module(nn.Sequential(nn.Conv2d(1, 4, 3)), {"c": "0"}, in_chans=1)
    assert gray.mean == pytest.approx((0.449,)) and gray.std == pytest.approx((0.226,))
    conv4 = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(UserError, match="no default mean for in_chans=4"):
        from_module(conv4, {"c": "0"}, in_chans=4)
    with pytest.raises(UserError, match="mean has 3 values but in_chans=4"):
        from_module(conv4, {"c": "0"}, in_chans=4, mean=(0.5,) * 3, std=(0.2,) * 4)
    ok = from_module(conv4, {"c": "0"}, in_chans=4, mean=[0.5] * 4, std=[0.2] * 4)
    assert ok.mean == (0.5,) * 4 and ok.config["std"] == [0.2] * 4


def test_modes_restored_gradients_flow_and_state_dict_prefixed():
    net = SmallCNN().train()
    net.conv2[1].eval()  # a frozen BN stays frozen after the dummy forward
    before = net.conv2[1].running_mean.clone()
    b = from_module(net, LAYERS)
    assert net.training and net.fc.training and not net.conv2[1].training
    torch.testing.assert_close(net.conv2[1].running_mean, before)
    feats = b.features(torch.randn(4, 3, 32, 32), ["c1", "backbone"])
    proj = Projector(b.embed_dim, "16-8")
    (feats["c1"].sum() + proj(feats["backbone"]).pow(2).mean()).backward()
    for name in ("conv1.weight", "conv2.0.weight", "fc.weight"):
        grad = b.module.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert net.head.weight.grad is None
    keys = list(b.state_dict())
    assert keys and all(k.startswith("module.") for k in keys)
    assert set(keys) == {f"module.{k}" for k in net.state_dict()}
    twin = from_module(SmallCNN(), LAYERS)
    twin.load_state_dict(b.state_dict())
    target = copy.deepcopy(b)  # as methods with a target network copy the encoder
    b.eval(), twin.eval(), target.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(twin(x), b(x))
    torch.testing.assert_close(target.features(x, ["c2"])["c2"], b.features(x, ["c2"])["c2"])


FACTORY_SRC = '''
from torch import nn
from ssl_lab.models import build_backbone, from_module

def good():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(6))
    return from_module(net, {"conv": "0", "out": "2"}, input_size=8)

def builtin():
    return build_backbone("vit", image_size=8, depth=1, dim=12, heads=2)

def bad():
    return nn.Linear(2, 2)

NOT_CALLABLE = 3
'''


def test_load_factory(tmp_path, monkeypatch):
    (tmp_path / "ssl_lab_test_factories.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ssl_lab_test_factories", raising=False)
    try:
        b = load_factory("import:ssl_lab_test_factories:good")
        assert isinstance(b, ModuleBackbone) and b.feature_dims == {"conv": 4, "backbone": 6}
        assert load_factory("import:ssl_lab_test_factories:builtin").embed_dim == 12
        with pytest.raises(UserError, match="returned Linear, not a backbone"):
            load_factory("import:ssl_lab_test_factories:bad")
        with pytest.raises(UserError, match="no callable 'NOT_CALLABLE'"):
            load_factory("import:ssl_lab_test_factories:NOT_CALLABLE")
        with pytest.raises(UserError, match="no callable 'missing'"):
            load_factory("import:ssl_lab_test_factories:missing")
    finally:
        sys.modules.pop("ssl_lab_test_factories", None)
    with pytest.raises(UserError, match="cannot import 'ssl_lab_no_such_module_xyz'"):
        load_factory("import:ssl_lab_no_such_module_xyz:f")
    for bad in ("ssl_lab_test_factories:good", "import:", "import:mod", "import::f"):
        with pytest.raises(UserError, match="import:package.module:factory"):
            load_factory(bad)
