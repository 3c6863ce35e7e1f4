"""A seeded fuzz of every config key: right and wrong types, signs, sizes and non-finite values,
through the path `ssl-lab train` takes (load_config, then train_setup.build, which validates every
input and writes nothing). Every outcome must be a success or a UserError of one bounded line;
never another exception, never a file written. The rcdm and infusion configs and the sample /
score options go through their own load functions the same way."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_run_overrides

from ssl_lab.cli import main
from ssl_lab.config import RANGES, Config, load_config
from ssl_lab.config_io import all_keys, flatten, to_dict
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion_config, rcdm_config
from ssl_lab.train_setup import build

# YAML text as typed after `key=`: numbers of every sign and size, non-finite floats, strings,
# empty, lists, mappings, null, booleans, and values far too long to echo
POOL = ["0", "1", "-1", "2", "0.5", "-0.5", "3.7", "1e30", str(10**30), "-" + str(10**30),
        "9" * 5000, ".nan", ".inf", "-.inf", "nan", "inf", "abc", "''", "[1,2]", "[]", "null",
        "{a: 1}", "true", "x" * 5000, "1e-300", "all", "0x10", "2**63", "64", "4096", "100",
        "2048g-2048g-256u-65536w", "vit_tiny", "-0", "1_000", "~", "'1'", "[.nan]"]
PER_KEY = 6  # sampled values per key: every key is covered, not the full cross product


def _values(key: str, seed: int = 26) -> list[str]:
    rng = random.Random(f"{seed}:{key}")  # a string seed: the same draw on every platform
    return rng.sample(POOL, PER_KEY)


def _check_message(exc: UserError, what: str) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) < 400, f"{what}: {text[:500]}"


def _in_range(cfg, table: dict) -> None:
    """What was accepted lies in its key's documented range (the validator's own contract)."""
    flat = flatten(to_dict(cfg))
    for key, rule in table.items():
        value = flat[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert rule.problem(value) is None, f"{key}={value!r} accepted outside {rule}"


def test_fuzz_every_training_key_through_load_and_build(tmp_path, capsys):
    """~95 keys x 5 values: success (then nothing written) or one clear line, nothing else."""
    threads = torch.get_num_threads()
    run = tmp_path / "run"
    base = tiny_run_overrides(run, **{"data.fraction": 0.05, "eval.enabled": "false"})
    refused = []
    for key in all_keys(Config):
        for text in _values(key):
            what = f"{key}={text[:40]}"
            try:
                cfg = load_config(None, [*base, f"{key}={text}"])
                _in_range(cfg, RANGES)
                build(cfg)
            except UserError as exc:
                _check_message(exc, what)
                refused.append([*base, f"{key}={text}"])
            except Exception as exc:  # noqa: BLE001 (the point: name the case that broke)
                pytest.fail(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
            finally:
                torch.set_num_threads(threads)  # train.threads=2 must not leak into later tests
            assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["cache"]), what
    assert len(refused) > 100  # the pool is mostly wrong: most cases must have been refused
    capsys.readouterr()
    # the same refusals through the command line: exit 2, one line, nothing written
    for args in random.Random(26).sample(refused, 8):
        assert main(["train", *args]) == 2, args[-1][:60]
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and len(err) < 400, err[:500]
        assert not run.exists()


def test_fuzz_every_training_key_in_a_yaml_file(tmp_path):
    """The same values written into a config file (the YAML path, not key=value)."""
    path = tmp_path / "fuzz.yaml"
    for key in all_keys(Config):
        section, _, name = key.rpartition(".")
        for text in _values(key, seed=28):
            path.write_text(f"{section}:\n  {name}: {text}\n" if section else f"{key}: {text}\n")
            _one(load_config, path, RANGES, f"yaml {key}: {text[:40]}")
    assert sorted(p.name for p in tmp_path.iterdir()) in (["fuzz.yaml"], ["cache", "fuzz.yaml"])


@pytest.mark.parametrize("name", ["rcdm", "infusion"])
def test_fuzz_every_generative_config_key(name, tmp_path):
    """Every key of `rcdm train` and `infusion train` through their load functions."""
    cls, load, table = {
        "rcdm": (rcdm_config.RCDMConfig, lambda o: rcdm_config.load_train_config(None, o),
                 rcdm_config.RANGES),
        "infusion": (infusion_config.InfusionConfig,
                     lambda o: infusion_config.load_infusion_config(None, o),
                     infusion_config.RANGES)}[name]
    for key in all_keys(cls):
        for text in _values(key):
            args = [f"run.dir={tmp_path / 'run'}", f"{key}={text}"]
            _one(load, args, table, f"{name} {key}={text[:40]}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cls, parse, table", [
    (rcdm_config.SampleArgs, lambda o: rcdm_config.parse_args(rcdm_config.SampleArgs, o),
     rcdm_config.ARG_RANGES),
    (rcdm_config.ScoreArgs, lambda o: rcdm_config.parse_args(rcdm_config.ScoreArgs, o),
     rcdm_config.SCORE_RANGES),
    (infusion_config.SampleArgs, infusion_config.parse_sample_args,
     infusion_config.SAMPLE_RANGES),
], ids=["rcdm-sample", "rcdm-score", "infusion-sample"])
def test_fuzz_sample_and_score_options(cls, parse, table, tmp_path):
    for key in all_keys(cls):
        for text in _values(key, seed=27):
            if key == "out":
                text = str(tmp_path / "new")  # a real out= must not land in the repository
            _one(parse, [f"{key}={text}"], table, f"{cls.__name__} {key}={text[:40]}")
    assert not (tmp_path / "new").exists()


def _one(load, args, table: dict, what: str) -> None:
    try:
        cfg = load(args)
    except UserError as exc:
        _check_message(exc, what)
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
    _in_range(cfg, table)


def test_the_pool_reaches_every_kind_of_value():
    """Guard for the sampling: every key sees at least one value of a wrong kind."""
    wrong = {"abc", "''", "[1,2]", "[]", "{a: 1}", "x" * 5000, ".nan", ".inf", "-.inf", "nan",
             "inf", "9" * 5000, "1e30", str(10**30), "-" + str(10**30), "-1", "-0.5", "2**63"}
    for key in all_keys(Config):
        assert wrong & set(_values(key)), key
    assert math.isnan(float("nan"))  # (the pool's "nan" is a float to YAML-lenient keys)
