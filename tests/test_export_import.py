"""`ssl-lab export` (an encoder cut at a layer) and `ssl-lab import` (torchvision ResNets)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import export as export_mod
from ssl_lab import importer
from ssl_lab.config import load_config
from ssl_lab.config_io import save_config
from ssl_lab.errors import UserError
from ssl_lab.eval.run import evaluate_run
from ssl_lab.export import export, load_exported
from ssl_lab.methods import SSLModel, get_method
from ssl_lab.models.encoder import Encoder, load_encoder


def _run(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ssl-lab")
    sub = parser.add_subparsers(dest="command", required=True)
    export_mod.add_commands(sub)
    importer.add_commands(sub)
    ns = parser.parse_args(args)
    ns.func(ns)


def fake_run(run: Path, model: dict, in_chans: int = 1, size: int = 16,
             best: str | None = "stage2") -> Encoder:
    """A run directory as `train` leaves it (BYOL: the checkpoint also holds model.target.*),
    with every weight and BN statistic randomised so that features depend on all of them."""
    cfg = load_config(None, [f"model.{k}={v}" for k, v in model.items()] + ["method.name=byol"])
    torch.manual_seed(0)
    encoder = Encoder(cfg.model, in_chans, size, [0.4] * in_chans, [0.2] * in_chans)
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) * 0.5 + 0.5 if tensor.dim() <= 1
                             else torch.randn_like(tensor) * 0.3)
    ssl = SSLModel(encoder, get_method("byol"), cfg.method, num_classes=10)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    spec = {"model": vars(cfg.model), "in_chans": in_chans, "image_size": size,
            "mean": [0.4] * in_chans, "std": [0.2] * in_chans, "num_classes": 10,
            "dataset": "digits", "target": None}
    (run / "encoder.json").write_text(json.dumps(spec))
    ckpt_io.save_checkpoint(run, 12, {"model": ssl}, {"step": 12, "epoch": 1})
    if best:
        (run / "summary.json").write_text(json.dumps({"best_layer": best}))
    return encoder.eval()


RESNET = {"backbone": "resnet18", "width": 0.125, "projector": "32-16", "last_width": 24}


@pytest.mark.parametrize("layer,absent", [
    ("stage2", ["backbone.layer3.", "backbone.layer4.", "projector."]),
    ("backbone", ["projector."]),
    ("proj1", ["projector.blocks.1."]),
])
def test_export_matches_the_full_model_at_that_layer(tmp_path, layer, absent):
    full = fake_run(tmp_path / "run", RESNET)
    out = export(tmp_path / "run", layer, tmp_path / "cut")
    keys = set(load_file(str(out / "encoder.safetensors")))
    assert {"mean", "std", "backbone.conv1.weight", "backbone.layer1.0.bn1.running_var"} <= keys
    assert not [k for k in keys if k.startswith(tuple(absent))]
    assert not [k for k in keys if k.startswith(("target.", "predictor."))]

    net = load_exported(out)
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        got, want = net(x), full.features(x, [layer])[layer]
    meta = json.loads((out / "export.json").read_text())
    assert got.shape == (5, net.width) and net.width == meta["width"] == full.feature_dims[layer]
    assert meta["layer"] == layer and meta["encoder"]["model"]["last_width"] == 24
    torch.testing.assert_close(got, want)
    if layer != "proj1":  # a deeper layer is not part of the export: an error, never garbage
        with pytest.raises(UserError, match="exported cut at"):
            net.encoder.features(x, ["proj1"])


def test_export_vit_block_and_best_from_the_command_line(tmp_path, capsys):
    vit = {"backbone": "vit", "width": 0.1, "projector": "16-8"}
    full = fake_run(tmp_path / "run", vit, in_chans=3, best="block2")
    _run(["export", str(tmp_path / "run"), "layer=best"])
    out = tmp_path / "run" / "export-block2"
    keys = set(load_file(str(out / "encoder.safetensors")))
    assert "backbone.pos_embed" in keys and "backbone.blocks.1.mlp.fc2.weight" in keys
    assert not [k for k in keys if k.startswith(("backbone.blocks.2.", "backbone.norm."))]
    net = load_exported(out / "export.json")
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), full.features(x, ["block2"])["block2"])
    assert "exported layer block2" in capsys.readouterr().out
    _run(["export", str(tmp_path / "run"), "layer=best"])  # re-export replaces the old one


def test_export_errors(tmp_path):
    fake_run(tmp_path / "run", RESNET, best=None)
    with pytest.raises(UserError, match="no best_layer"):
        export(tmp_path / "run")
    with pytest.raises(UserError, match="valid layers: stage1, stage2, stage3, backbone, proj1"):
        export(tmp_path / "run", "stage9")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an ssl-lab export"):
        export(tmp_path / "run", "stage1", tmp_path / "busy")
    with pytest.raises(UserError, match="not an ssl-lab export"):
        load_exported(tmp_path / "busy")
    with pytest.raises(UserError, match="not an ssl-lab run"):
        export(tmp_path / "busy")


# ----------------------------------------------------------------------------- import


def torchvision_resnet(arch: str, width: float = 1.0, in_chans: int = 3,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict named and shaped like torchvision's ResNet (written out here, not
    imported, so the test checks the layout independently of ssl_lab.models.resnet)."""
    bottleneck, blocks = {"resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)),
                          "resnet50": (True, (3, 4, 6, 3))}[arch]
    expansion = 4 if bottleneck else 1
    shapes: dict[str, tuple] = {}

    def conv_bn(conv: str, bn: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{conv}.weight"] = (cout, cin, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{name}"] = (cout,)
        shapes[f"{bn}.num_batches_tracked"] = ()

    cin = round(64 * width)
    conv_bn("conv1", "bn1", cin, in_chans, 7)
    for s, n in enumerate(blocks):
        planes = round(64 * 2 ** s * width)
        for b in range(n):
            pre = f"layer{s + 1}.{b}"
            convs = ([(planes, cin, 1), (planes, planes, 3), (planes * 4, planes, 1)] if bottleneck
                     else [(planes, cin, 3), (planes, planes, 3)])
            for i, (cout, c, k) in enumerate(convs, 1):
                conv_bn(f"{pre}.conv{i}", f"{pre}.bn{i}", cout, c, k)
            if b == 0 and (s > 0 or cin != planes * expansion):
                conv_bn(f"{pre}.downsample.0", f"{pre}.downsample.1", planes * expansion, cin, 1)
            cin = planes * expansion
    shapes |= {"fc.weight": (1000, cin), "fc.bias": (1000,)}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.tensor(7) if not shape else
            torch.rand(shape, generator=gen) + 0.5 if k.endswith("running_var") else
            torch.randn(shape, generator=gen) * 0.05 for k, shape in shapes.items()}


def _same_backbone(run: Path, state: dict[str, torch.Tensor]) -> None:
    encoder = load_encoder(run)
    own = encoder.backbone.state_dict()
    assert own.keys() == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_import_torchvision_resnet18_safetensors(tmp_path):
    state = torchvision_resnet("resnet18")
    save_file(state, str(tmp_path / "r18.safetensors"))
    _run(["import", str(tmp_path / "r18.safetensors"), str(tmp_path / "run"), "backbone=resnet18",
          "image_size=32", "data.name=digits"])
    run = tmp_path / "run"
    _same_backbone(run, state)
    spec = json.loads((run / "encoder.json").read_text())
    assert spec["mean"] == [0.485, 0.456, 0.406] and spec["model"]["projector"] == "none"
    cfg = load_config(run / "config.yaml")
    assert cfg.model.stem == "imagenet" and cfg.data.name == "digits"
    assert load_encoder(run).layer_names == ["stage1", "stage2", "stage3", "backbone"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000000"


def test_import_nested_prefixed_pth_then_evaluate(tmp_path, stripes_npz):
    state = torchvision_resnet("resnet50", width=1 / 16, in_chans=1)
    nested = {"epoch": 90, "state_dict": {f"module.backbone.{k}": v for k, v in state.items()}}
    nested["state_dict"]["module.projector.0.weight"] = torch.zeros(8, 8)
    torch.save(nested, tmp_path / "r50.pth")
    run = importer.import_resnet(tmp_path / "r50.pth", tmp_path / "run",
                                 [f"data.name=npz:{stripes_npz}"],
                                 backbone="resnet50", width=1 / 16, in_chans=1, image_size=16)
    _same_backbone(run, state)
    report = evaluate_run(run, ["eval.baselines=false"])
    assert list(report["layers"]) == ["stage1", "stage2", "stage3", "backbone"]
    assert 0 < report["layers"]["backbone"]["linear_test"] <= 1


def test_import_picks_among_several_networks(tmp_path):
    state = torchvision_resnet("resnet18", width=1 / 32)
    two = {f"module.encoder_q.{k}": v for k, v in state.items()}
    two |= {f"module.encoder_k.{k}": v * 0 for k, v in state.items()}
    save_file(two, str(tmp_path / "moco.safetensors"))
    kwargs = dict(backbone="resnet18", width=1 / 32, image_size=32)
    with pytest.raises(UserError, match="several ResNets.*prefix="):
        importer.import_resnet(tmp_path / "moco.safetensors", tmp_path / "a", **kwargs)
    run = importer.import_resnet(tmp_path / "moco.safetensors", tmp_path / "a",
                                 prefix="module.encoder_q", **kwargs)
    _same_backbone(run, state)


class NotATensor:
    pass


def test_import_refuses_bad_files(tmp_path):
    state = torchvision_resnet("resnet18", width=1 / 32)
    save_file(state, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"not a zip, not a pickle" * 10)
    torch.save({"state_dict": state, "extra": NotATensor()}, tmp_path / "pickled.pth")
    cases = {"cut.safetensors": "damaged or not safetensors", "junk.pth": "not tensors saved by torch.save",
             "pickled.pth": r"objects other than tensors .*NotATensor", "missing.pth": "not found"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            importer.import_resnet(tmp_path / name, tmp_path / "run", backbone="resnet18",
                                   width=1 / 32)
    with pytest.raises(UserError, match=r"missing .*layer1\.2.*like resnet18 with width=0.03"):
        importer.import_resnet(tmp_path / "ok.safetensors", tmp_path / "run", backbone="resnet34",
                               width=1 / 32)
    with pytest.raises(UserError, match="another shape"):
        importer.import_resnet(tmp_path / "ok.safetensors", tmp_path / "run", backbone="resnet18",
                               width=1 / 16)
    with pytest.raises(UserError, match="backbone must be one of"):
        importer.import_resnet(tmp_path / "ok.safetensors", tmp_path / "run", backbone="vit")
    assert not (tmp_path / "run").exists()  # nothing half-written
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(UserError, match="already exists"):
        importer.import_resnet(tmp_path / "ok.safetensors", tmp_path / "run", backbone="resnet18",
                               width=1 / 32)
