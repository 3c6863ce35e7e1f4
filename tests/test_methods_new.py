"""DINO, MoCo v3 and SimSiam as methods: heads, target networks, the training-step hooks, the
optimizer's fixed predictor lr, resume, ViT backbones. (Their losses: tests/test_losses.py;
2 processes = 1 process: tests/test_dist.py; every config runs: tests/test_train.py.)"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import checkpoint_weights, tiny_run_overrides
from torch import nn

from ssl_lab.config import MethodConfig, ModelConfig, OptimConfig, load_config
from ssl_lab.errors import UserError
from ssl_lab.methods import Progress, SSLModel, byol_momentum, get_method, teacher_temperature
from ssl_lab.models import Projector, parse_projector_spec
from ssl_lab.models.encoder import Encoder
from ssl_lab.models.projector import PrototypeLinear
from ssl_lab.optim import build_optimizer, param_groups, set_lr
from ssl_lab.train_loop import train

ROOT = Path(__file__).parents[1]
DINO_HEAD = "16g-16g-8u-32w"


def tiny_model(name: str, projector: str, **method) -> SSLModel:
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(width=0.125, last_width=None, stem="cifar", projector=projector),
                  in_chans=1, image_size=8, mean=[0.5], std=[0.25])
    mc = MethodConfig(name=name, predictor="16n", **method)
    return SSLModel(enc, get_method(name), mc, num_classes=3).train()


def views(v: int, n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(v, n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- heads


def test_projector_spec_flags_of_the_new_heads():
    dino = parse_projector_spec(DINO_HEAD)
    assert [(s.gelu, s.unit_norm, s.weight_norm, s.bn) for s in dino] == [
        (True, False, False, False), (True, False, False, False), (False, True, False, False),
        (False, False, True, False)]
    assert not dino[-1].bias  # prototypes have no bias
    moco = parse_projector_spec("64n-32ns")
    assert [(s.bias, s.bn, s.affine, s.relu) for s in moco] == [
        (False, True, True, True), (False, True, False, False)]
    bn_gelu = parse_projector_spec("8bg-4")[0]
    assert (bn_gelu.bn, bn_gelu.affine, bn_gelu.gelu, bn_gelu.relu) == (True, True, True, False)
    assert [type(m) for m in Projector(6, "8bg-4").blocks[0]] == [nn.Linear, nn.BatchNorm1d,
                                                                 nn.GELU]
    for bad in ("8gu", "8bs", "8ww", "8gr", "8bgr", "8q"):
        with pytest.raises(UserError, match="projector spec"):
            parse_projector_spec(bad)


def test_dino_head_layers():
    torch.manual_seed(0)
    head = Projector(12, DINO_HEAD).eval()
    assert head.layer_names == ["proj1", "proj2", "proj3", "proj4"] and head.out_dim == 32
    h = torch.randn(5, 12)
    out = head.forward_layers(h)
    torch.testing.assert_close(out["proj3"].norm(dim=1), torch.ones(5))  # unit bottleneck
    last = head.blocks[-1][0]
    assert isinstance(last, PrototypeLinear) and last.bias is None
    torch.testing.assert_close(out["proj4"], out["proj3"] @ F.normalize(last.weight, dim=1).T)
    assert out["proj4"].abs().max() <= 1 + 1e-6  # unit input · unit prototypes
    assert isinstance(head.blocks[0][1], nn.GELU) and len(head.blocks[0]) == 2
    first = head.blocks[0][0]  # DINOHead's init: truncated normal std 0.02, zero bias
    assert 0.015 < first.weight.std().item() < 0.025 and not first.bias.any()
    moco = Projector(12, "16n-8ns")
    bn = moco.blocks[1][1]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and len(moco.blocks[1]) == 2


# ----------------------------------------------------------------------------- forward + hooks


def test_dino_teacher_sees_only_the_global_views():
    model = tiny_model("dino", DINO_HEAD)
    out = model(views(2), ["proj3"], views(3, seed=1))
    assert out["z"].shape == (5, 4, 32) and out["z_target"].shape == (2, 4, 32)
    # at init the teacher is the student: its views line up with the student's first V
    torch.testing.assert_close(out["z_target"], out["z"][:2].detach())
    assert out["features"]["proj3"].shape == (8, 8)  # the probed features are the global views'
    assert torch.equal(out["center"], torch.zeros(32))
    assert out["teacher_temp"].ndim == 0 and math.isclose(out["teacher_temp"].item(), 0.04,
                                                          rel_tol=1e-6)
    loss = get_method("dino").loss(out, None, model.method_cfg, None)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    state = model.state_dict()  # the center is saved; the temperature comes from the step
    assert "center" in state and "teacher_temp" not in state


@pytest.mark.parametrize("name", ["mocov3", "simsiam"])
def test_predictor_methods_forward(name):
    model = tiny_model(name, "16n-8ns")
    out = model(views(2), [], views(2, seed=1))
    assert out["p"].shape == out["z"].shape == (4, 4, 8)
    assert (model.target is not None) == (name == "mocov3") == ("z_target" in out)
    if name == "mocov3":  # MoCo v3 keys every view, small ones included (as BYOL's targets)
        assert out["z_target"].shape == (4, 4, 8)
    assert model.center is None and "center" not in out


def _backward(model: SSLModel) -> None:
    model.zero_grad(set_to_none=True)
    out = model(views(3), [])
    get_method(model.method_cfg.name).loss(out, None, model.method_cfg, None).backward()


def test_dino_freezes_its_last_layer_then_lets_it_learn():
    model = tiny_model("dino", DINO_HEAD, freeze_last_layer_epochs=1.0)
    last = model.last_layer_parameters()
    assert len(last) == 1 and last[0] is model.encoder.projector.blocks[-1][0].weight
    for step, frozen in ((0, True), (3, True), (4, False)):  # 4 steps per epoch
        model.begin_step(Progress(step, 20, 4))
        _backward(model)
        model.before_update()
        assert (last[0].grad is None) == frozen, step
        assert model.encoder.projector.blocks[0][0].weight.grad is not None


def test_clip_grad_clips_each_parameter_on_its_own():
    model = tiny_model("dino", DINO_HEAD, clip_grad=0.05, freeze_last_layer_epochs=0.0)
    _backward(model)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.before_update()
    clipped = 0
    for n, p in model.named_parameters():
        if n not in before:
            continue
        norm = before[n].norm()
        if norm > 0.05:  # DINO: grad * clip / (norm + 1e-6)
            torch.testing.assert_close(p.grad, before[n] * (0.05 / (norm + 1e-6)))
            clipped += 1
        else:
            assert torch.equal(p.grad, before[n])
    assert 0 < clipped < len(before)


def test_dino_end_step_updates_teacher_and_center():
    model = tiny_model("dino", DINO_HEAD, momentum=0.9, center_momentum=0.8)
    center = torch.zeros(32)
    for step in range(2):
        model.begin_step(Progress(step, 10, 5))
        with torch.no_grad():
            for p in model.encoder.parameters():  # an "optimizer step" on the student
                p.add_(0.01)
        out = model(views(2, seed=step), [], views(2, size=6, seed=9))
        target_before = [t.clone() for t in model.target.parameters()]
        model.end_step(out)
        center = 0.8 * center + 0.2 * out["z_target"].float().mean(dim=(0, 1))
        torch.testing.assert_close(model.center, center)
        m = byol_momentum(0.9, step, 10)
        for t0, t1, s in zip(target_before, model.target.parameters(), model.encoder.parameters(),
                             strict=True):
            torch.testing.assert_close(t1, m * t0 + (1 - m) * s)
    assert model.center.abs().sum() > 0


def test_teacher_temperature_warms_up_linearly_in_epochs():
    mc = MethodConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    assert teacher_temperature(mc, 0.0) == 0.04
    assert math.isclose(teacher_temperature(mc, 0.5), 0.0475)
    assert teacher_temperature(mc, 2.0) == teacher_temperature(mc, 9.0) == 0.07
    assert teacher_temperature(MethodConfig(teacher_temp=0.05), 0.0) == 0.05  # no warm-up
    model = tiny_model("dino", DINO_HEAD, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=2)
    model.begin_step(Progress(5, 100, 10))  # epoch 0.5
    assert math.isclose(model(views(2), [])["teacher_temp"].item(), 0.0475, rel_tol=1e-6)


@pytest.mark.parametrize("override,key", [
    ("method.teacher_temp=0", "method.teacher_temp"),
    ("method.student_temp=-1", "method.student_temp"),
    ("method.center_momentum=1.5", "method.center_momentum"),
    ("method.freeze_last_layer_epochs=-1", "method.freeze_last_layer_epochs"),
    ("method.clip_grad=-0.5", "method.clip_grad"),
])
def test_bad_method_values_are_user_errors(override, key):
    with pytest.raises(UserError, match=key):
        load_config(None, [override])


def test_dino_steps_equal_a_transcription_of_the_authors_train_one_epoch():
    """Three SGD steps of SSLModel (hooks + loss) against main_dino.py's loop written out:
    teacher on the 2 global crops, DINOLoss with its center update, clip_gradients,
    cancel_gradients_last_layer, then the EMA of the student's parameters."""
    import copy

    mc_kw = dict(momentum=0.9, clip_grad=0.05, freeze_last_layer_epochs=1.0,
                 warmup_teacher_temp=0.05, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    ours = tiny_model("dino", DINO_HEAD, **mc_kw)
    student = copy.deepcopy(ours.encoder)
    teacher = copy.deepcopy(student).requires_grad_(False)
    center = torch.zeros(1, 32)
    opt_a = torch.optim.SGD(ours.trainable_modules()[0].parameters(), lr=0.3)
    opt_b = torch.optim.SGD(student.parameters(), lr=0.3)
    for step in range(3):  # 2 steps per epoch: the last layer learns from step 2 on
        g, s = views(2, seed=step), views(3, size=6, seed=10 + step)
        ours.begin_step(Progress(step, 6, 2))
        out = ours(g, [], s)
        get_method("dino").loss(out, None, ours.method_cfg, None).backward()
        ours.before_update()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        ours.end_step(out)

        epoch, temp = step // 2, 0.05 + (0.07 - 0.05) * step / 2 / 2
        teacher_output = teacher(g.flatten(0, 1))
        student_output = torch.cat([student(g.flatten(0, 1)), student(s.flatten(0, 1))])
        student_out = (student_output / 0.1).chunk(5)
        teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v != iq:
                    total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                    n_terms += 1
        center = center * 0.9 + teacher_output.sum(0, keepdim=True) / len(teacher_output) * 0.1
        (total / n_terms).backward()
        for p in student.parameters():
            norm = p.grad.norm(2)
            if 0.05 / (norm + 1e-6) < 1:
                p.grad.mul_(0.05 / (norm + 1e-6))
        if epoch < 1:
            student.projector.blocks[-1][0].weight.grad = None
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        m = 1 - (1 - 0.9) * (math.cos(math.pi * step / 6) + 1) / 2
        with torch.no_grad():
            for q, k in zip(student.parameters(), teacher.parameters(), strict=True):
                k.mul_(m).add_((1 - m) * q)
    torch.testing.assert_close(ours.center, center[0])
    for (name, a), b in zip(ours.encoder.named_parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(ours.target.parameters(), teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- optimizer


def test_simsiam_predictor_keeps_the_peak_lr():
    model = tiny_model("simsiam", "16n-8ns", predictor_fixed_lr=True)
    opt = build_optimizer(model.trainable_modules(), OptimConfig(name="sgd"), 0.5)
    assert len(opt.param_groups) == 4
    pred = {id(p) for p in model.predictor.parameters()}
    set_lr(opt, 0.1)
    for g in opt.param_groups:
        in_pred = {id(p) in pred for p in g["params"]}
        assert len(in_pred) == 1  # a group is all predictor or all encoder
        assert g["lr"] == (0.5 if in_pred == {True} else 0.1)
    # the fixed lr survives a checkpoint round trip (resume)
    fresh = build_optimizer(model.trainable_modules(), OptimConfig(name="sgd"), 0.9)
    fresh.load_state_dict(opt.state_dict())
    set_lr(fresh, 0.2)
    assert sorted(g["lr"] for g in fresh.param_groups) == [0.2, 0.2, 0.5, 0.5]


def test_without_a_fixed_lr_module_the_groups_are_unchanged():
    model = tiny_model("simsiam", "16n-8ns")  # predictor_fixed_lr off
    groups = param_groups(model.trainable_modules(), 1e-4)
    params = [p for m in model.trainable_modules() for p in m.parameters()]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] and "lars_exclude" in groups[1]
    assert groups[0]["params"] == [p for p in params if p.ndim > 1]
    assert groups[1]["params"] == [p for p in params if p.ndim <= 1]
    opt = build_optimizer(model.trainable_modules(), OptimConfig(name="lars"), 0.3)
    set_lr(opt, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]


# ----------------------------------------------------------------------------- training runs


def test_dino_resume_is_bit_exact_with_center_and_temperature_schedule(tmp_path):
    """Multi-crop DINO killed mid-run (during the teacher-temperature warm-up, after the last
    layer was unfrozen) and resumed ends with the uninterrupted run's weights and center."""
    extra = {"method.name": "dino", "model.projector": DINO_HEAD, "views.n": 2,
             "views.small_n": 2, "method.warmup_teacher_temp": 0.04, "method.teacher_temp": 0.07,
             "method.warmup_teacher_temp_epochs": 2, "method.freeze_last_layer_epochs": 1,
             "method.clip_grad": 3.0, "method.momentum": 0.9, "eval.enabled": False,
             "train.ckpt_every_steps": 3, "views.recipe": "byol"}
    straight = train(load_config(None, tiny_run_overrides(tmp_path / "a", **extra)))
    crashed = tiny_run_overrides(tmp_path / "b", **extra)
    train(load_config(None, crashed), stop_at_step=7)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    train(load_config(None, [*crashed, "resume=true"]))
    a, b = checkpoint_weights(straight), checkpoint_weights(tmp_path / "b")
    assert a.keys() == b.keys() and "model.center" in a
    assert a["model.center"].abs().sum() > 0
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"


@pytest.mark.parametrize("name,extra", [
    ("dino", {"model.projector": DINO_HEAD, "views.n": 2, "views.small_n": 2,
              "views.small_size": 8}),  # a ViT's local crops keep its image size
    ("mocov3", {"model.projector": "16n-8ns", "method.predictor": "16n"}),
])
def test_new_methods_train_a_vit(tmp_path, name, extra):
    over = tiny_run_overrides(tmp_path / "r", **{
        "method.name": name, "model.backbone": "vit", "eval.enabled": False,
        "train.epochs": 1, **extra})
    run = train(load_config(None, over), stop_at_step=2)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and math.isfinite(last["loss"])
    assert "online/proj2" in last


def test_methods_table_has_a_column_for_every_layer(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "bench" /
                                                  "methods_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    row = {"best_layer": "backbone", "knn_top1": 0.5, "epochs": 1.0, "train_s": 1.0,
           "views_per_s": 1.0}
    text = table.table([("byol", {**row, "probes": {"backbone": 0.8, "proj1": 0.7}}),
                        ("dino", {**row, "probes": {"backbone": 0.9, "proj1": 0.6, "proj4": 0.5}})])
    head, _, byol_row, dino_row = text.splitlines()
    assert "| proj4 |" in head and byol_row.count(" - ") == 1 and "| 50.0 |" in dino_row


def test_a_dino_runs_head_layers_are_probed_exported_and_condition_rcdm(tmp_path):
    """DINO's head layers are ordinary layer names everywhere: offline probes of every head
    layer, export at the bottleneck, and RCDM conditioned on it for a few steps."""
    from ssl_lab.eval.run import evaluate_run
    from ssl_lab.export import export, load_exported
    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    over = tiny_run_overrides(tmp_path / "d", **{
        "method.name": "dino", "model.projector": DINO_HEAD, "views.n": 2,
        "views.recipe": "byol", "eval.enabled": False, "train.epochs": 1})
    run = train(load_config(None, over))
    report = evaluate_run(run, ["eval.baselines=false", "eval.knn_k=5"])
    assert {"proj1", "proj2", "proj3", "proj4"} <= set(report["layers"])
    out = export(run, "proj3", str(tmp_path / "exp"))
    net = load_exported(out)
    x = torch.rand(3, net.in_chans, net.image_size, net.image_size)
    z = net(x)
    assert net.layer == "proj3" and z.shape == (3, net.width)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)  # the L2-normalised bottleneck
    rcdm = train_rcdm(load_train_config(str(run), [
        f"run.dir={tmp_path / 'r'}", "layer=proj3", "unet.size=16", "unet.channels=16-32",
        "data.fraction=0.1", "train.batch_size=32", "train.epochs=1", "train.preview=false"]))
    summary = json.loads((rcdm / "summary.json").read_text())
    assert summary["layer"] == "proj3" and math.isfinite(summary["final_loss"])
