from pathlib import Path

import pytest
import yaml

from ssl_lab.config import Config, load_config
from ssl_lab.config_io import from_dict, save_config, to_dict
from ssl_lab.errors import UserError

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
    ("views.n=1", "views.n must be >= 2"),
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
