import json
import math
import time
import typing
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_overrides

from ssl_lab.cli import main
from ssl_lab.config import RANGES, Config, check_ranges, load_config
from ssl_lab.config_io import (
    MAX_CONFIG_BYTES,
    cut,
    from_dict,
    leaf_hints,
    numeric_keys,
    save_config,
    short,
    to_dict,
)
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion_config, rcdm_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_default_yaml_is_the_default_config():
    """`ssl-lab train` without arguments and configs/default.yaml must be the same experiment."""
    assert to_dict(load_config(CONFIGS[0].parent / "default.yaml")) == to_dict(Config())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_loads(path):
    load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.lr=0.5", "model.last_width=64", "method.negatives=1",
                             "train.budget_s=null", "data.name=digits"])
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.model.last_width == 64 and cfg.method.negatives == 1
    assert cfg.train.budget_s is None and cfg.data.name == "digits"


def test_yaml_quirks_mean_what_was_typed():
    cfg = load_config(None, ["optim.lr=1e-3", "model.projector=128"])
    assert cfg.optim.lr == 1e-3 and cfg.model.projector == "128"
    assert load_config(None, ["method.negatives=1"]).method.negatives == 1


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["seed=3", "views.n=4", "method.name=vicreg"])
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "did you mean 'optim.lr'"),
    ("nosuchsection.x=1", "unknown config key"),
    ("optim.lr=fast", "expects float"),
    ("optim.batch_size=3.5", "expects int"),
    ("train.channels_last=maybe", "expects bool"),
    ("optim.lr=-1", "must be > 0"),
    ("views.n=1", "'views.n' must be >= 2 (allowed"),
    ("data.fraction=1.5", "data.fraction"),
    ("optim.name=adam", "must be one of"),
    ("method.negatives=0", "method.negatives"),
    ("lr", "not key=value"),
])
def test_bad_values_are_user_errors(override, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        load_config(None, [override])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text(yaml.safe_dump({"optim": 3}))
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(bad)


def test_from_dict_rejects_unknown_nested_key():
    with pytest.raises(UserError, match="model.widht"):
        from_dict({"model": {"widht": 2}}, Config)


# ----------------------------------------------------------------------------- numeric ranges

TABLES = [(Config, RANGES), (rcdm_config.RCDMConfig, rcdm_config.RANGES),
          (rcdm_config.SampleArgs, rcdm_config.ARG_RANGES),
          (rcdm_config.ScoreArgs, rcdm_config.SCORE_RANGES),
          (infusion_config.InfusionConfig, infusion_config.RANGES),
          (infusion_config.SampleArgs, infusion_config.SAMPLE_RANGES)]


@pytest.mark.parametrize("cls, table", TABLES, ids=lambda x: getattr(x, "__name__", ""))
def test_every_numeric_key_has_a_range(cls, table):
    """Enumerated from the dataclasses: a new numeric key without a documented range fails here."""
    assert sorted(numeric_keys(cls)) == sorted(table)
    for key, rule in table.items():
        assert rule.low > -math.inf, key  # every range has a lower bound...
        if _takes_int(cls, key):
            assert rule.high < math.inf, key  # ...and an int key an upper one (no 10**30)


def _takes_int(cls, key):
    hint = leaf_hints(cls)[key]
    return hint is int or int in typing.get_args(hint)


def _outside(rule, integer):
    """Values just outside a range, and (for float keys) non-finite ones."""
    step = 1 if integer else 0.01
    out = [rule.low if rule.open_low else rule.low - step]
    if rule.high < math.inf:
        out.append(rule.high if rule.open_high else rule.high + step)
    return out + ([] if integer else [math.nan, math.inf, -math.inf])


@pytest.mark.parametrize("key", sorted(RANGES))
def test_training_config_ranges_are_enforced(key):
    """Each bound of the table is what load_config accepts; one line names key, value and range."""
    rule, integer = RANGES[key], _takes_int(Config, key)
    for value in _outside(rule, integer):
        with pytest.raises(UserError) as info:
            load_config(None, [f"{key}={_yaml(value)}"])
        text = str(info.value)
        assert f"'{key}'" in text and "\n" not in text and len(text) < 300, text
        assert f"(allowed: {rule}" in text, text
    extra = ["views.ramp_end=null"] if key == "views.ramp_start" else []
    for value, excluded in ((rule.low, rule.open_low), (rule.high, rule.open_high)):
        if not excluded and value < math.inf:
            value = int(value) if integer else value
            cfg = load_config(None, [f"{key}={value}", *extra])
            assert dict(_flat(cfg))[key] == value


def _flat(cfg):
    from ssl_lab.config_io import flatten

    return flatten(to_dict(cfg)).items()


def _yaml(value):
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if value != value else (".inf" if value > 0 else "-.inf")
    return value


def test_range_messages_are_bounded():
    assert len(short("x" * 10**6)) <= 63 and len(short(list(range(10**5)))) <= 63
    assert "too large" in short(int("9" * 4000) ** 2)  # beyond Python's int-to-str limit
    assert cut("p" * 500).endswith("...") and len(cut("p" * 500)) == 123
    cfg = Config()
    cfg.optim.lr = float("nan")
    with pytest.raises(UserError, match=r"'optim.lr' must be a finite number \(allowed: \(0, inf\)\)"):
        check_ranges(cfg, RANGES)


# ----------------------------------------------------------------------------- config files


def test_config_file_damage_is_one_line(tmp_path):
    """Invalid UTF-8, an alias bomb, a huge file, deep nesting, a number of 5000 digits."""
    lol = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    files = {"utf.yaml": (b"optim:\n  lr: \xff\xfe0.1\n", "not UTF-8"),
             "bomb.yaml": (lol.encode(), "alias"),
             "huge.yaml": (b"run: {name: " + b"x" * MAX_CONFIG_BYTES + b"}\n", "larger than"),
             "deep.yaml": (b"a: " + b"[" * 3000 + b"]" * 3000, "nested too deeply"),
             "digits.yaml": (b"seed: " + b"9" * 5000, "number too long")}
    for name, (content, fragment) in files.items():
        (tmp_path / name).write_bytes(content)
        start = time.perf_counter()
        with pytest.raises(UserError) as info:
            load_config(tmp_path / name)
        assert time.perf_counter() - start < (1 if name == "bomb.yaml" else 5), name  # the bomb
        # is refused at its first alias (about 1 ms), not expanded to a MemoryError
        assert fragment in str(info.value) and name in str(info.value), info.value
        assert len(str(info.value)) < 300 and "\n" not in str(info.value)
    assert len(lol) < 460


def test_override_values_are_never_echoed_unbounded(capsys):
    for value in ("x" * 100000, "[" + "1," * 5000 + "1]", "9" * 5000):
        assert main(["train", f"optim.batch_size={value}"]) == 2
        err = capsys.readouterr().err
        assert len(err) < 300 and err.count("\n") == 1, err[:500]


# ----------------------------------------------------------------------------- rules on data size


def test_a_batch_larger_than_the_data_is_the_data_and_the_lr_follows_it(tmp_path, capsys):
    """README, Configuration notes: the capped batch is the run's batch (config.yaml records it)
    and the lr is scaled from it; one note line says so."""
    from ssl_lab.optim import scaled_lr
    from ssl_lab.train_setup import build

    run = tmp_path / "run"
    args = tiny_run_overrides(run, **{"data.fraction": 0.05, "optim.batch_size": 100000,
                                      "optim.warmup_epochs": 0, "train.epochs": 2,
                                      "eval.enabled": "false", "probe.online": "false"})
    setup = build(load_config(None, args))
    n = len(setup.data.ssl_train)
    assert setup.batch_size == setup.cfg.optim.batch_size == n < 100000
    assert setup.optimizer.param_groups[0]["lr"] == pytest.approx(0.008 * n / 256)
    assert scaled_lr(setup.cfg.optim) == pytest.approx(0.008 * n / 256)  # what each step sets
    assert capsys.readouterr().out.count("larger than the") == 1
    assert not run.exists()  # build writes nothing

    assert main(["train", *args]) == 0
    assert f"the run uses a batch of {n}" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["batch_size"] == n
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(0.008 * n / 256)  # step 0 of a run without warm-up


@pytest.mark.parametrize("extra, fragment", [
    ({"method.negatives": 100000}, "method.negatives=100000 is more than the"),
    ({"method.negatives": 253}, "set method.negatives <= 252"),  # 4 views x (64 - 1)
    ({"method.negatives": 400, "views.small_n": 2}, "6 views x (batch 64 - 1)"),  # multi-crop
])
def test_negatives_beyond_the_batch_are_refused_before_writing(tmp_path, capsys, extra, fragment):
    run = tmp_path / "run"
    args = tiny_run_overrides(run, **{"data.fraction": 0.05, "eval.enabled": "false", **extra})
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert not run.exists()


def test_negatives_that_fit_the_batch_are_accepted(tmp_path):
    from ssl_lab.train_setup import build

    args = tiny_run_overrides(tmp_path / "run", **{"data.fraction": 0.05,
                                                   "method.negatives": 252})
    assert build(load_config(None, args)).batch_size == 64


def test_a_config_built_in_python_is_validated_by_build(tmp_path):
    """ssl_lab.train(cfg) skips load_config: build checks the same table before anything."""
    from ssl_lab.train_setup import build

    cfg = load_config(None, tiny_run_overrides(tmp_path / "run", **{"data.fraction": 0.05}))
    for key, value, fragment in (("lr", float("nan"), "finite"), ("lr", "fast", "a number"),
                                 ("batch_size", 1, ">= 2"), ("final_lr_frac", -50.0, ">= 0")):
        bad = Config(**{**vars(cfg), "optim": type(cfg.optim)(**{**vars(cfg.optim), key: value})})
        with pytest.raises(UserError, match=f"'optim.{key}' (must be|expects) .*{fragment}"):
            build(bad)
    assert not (tmp_path / "run").exists()


def test_a_warm_up_longer_than_the_run_is_said(tmp_path, capsys):
    from ssl_lab.train_setup import build

    args = tiny_run_overrides(tmp_path / "run", **{"data.fraction": 0.05, "optim.batch_size": 16,
                                                   "train.epochs": 1, "optim.warmup_epochs": 2})
    build(load_config(None, args))
    out = capsys.readouterr().out
    assert "optim.warmup_epochs=2.0 (8 steps) covers the whole run (4 steps)" in out, out


# ----------------------------------------------------------------------------- sample options


def test_sample_folders_are_new_unless_overwrite(tmp_path):
    """The default folder of `rcdm sample` / `infusion sample` is checked like an explicit out=
    (the CLI resolves it first); overwrite=true is the one way to write into a used folder."""
    args = rcdm_config.parse_args(rcdm_config.SampleArgs, ["images=a.png"])
    folder = rcdm_config.sample_folder(tmp_path, args, rcdm_config.RCDMSampleConfig(k=3))
    assert folder == tmp_path / "samples" / "images-k3-steps50-seed0"
    folder.mkdir(parents=True)
    (folder / "grid.png").write_bytes(b"x")
    with pytest.raises(UserError, match="overwrite=true"):
        rcdm_config.parse_args(rcdm_config.SampleArgs, [f"out={folder}"])
    assert rcdm_config.parse_args(rcdm_config.SampleArgs, [f"out={folder}", "overwrite=true"])
    inf_args = infusion_config.parse_sample_args(["n=4", "chains=2"])
    inf_folder = infusion_config.sample_folder(tmp_path, inf_args)
    assert inf_folder == tmp_path / "samples" / "n4-chains2-seed0"
    inf_folder.mkdir(parents=True)
    (inf_folder / "samples.png").write_bytes(b"x")
    with pytest.raises(UserError, match="overwrite=true"):
        infusion_config.parse_sample_args([f"out={inf_folder}"])
    infusion_config.parse_sample_args([f"out={inf_folder}", "overwrite=true"])
