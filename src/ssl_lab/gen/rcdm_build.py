"""What `rcdm train`, `sample` and `score` share: the frozen encoder, the RCDM spec (rcdm.json),
the model, the encoder run's data, and a trained run loaded for sampling (`load_run`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.config import Config
from ssl_lab.config_io import from_dict, read_yaml, short
from ssl_lab.data.sources import DatasetSplits, load_dataset
from ssl_lab.errors import UserError
from ssl_lab.eval.inputs import match_channels
from ssl_lab.eval.run import extract_features
from ssl_lab.gen import rcdm
from ssl_lab.gen.rcdm_config import RCDMConfig, read_run_config
from ssl_lab.models.encoder import Encoder, encoder_from_spec, load_encoder, read_spec
from ssl_lab.runtime import path_kind, pick_device, read_json, resolve_precision, short_path

FEATURE_BATCH = 512


@dataclass
class Built:
    """A frozen encoder and an RCDM (the EMA weights, for sampling) on one device."""

    cfg: RCDMConfig
    spec: dict  # rcdm.json
    encoder: Encoder
    model: rcdm.RCDM
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.spec["in_channels"], self.spec["size"], self.spec["size"])

    @property
    def content(self) -> int:
        return self.spec["content"]


def check_encoder_dir(path: str) -> dict:
    """The encoder run's spec (encoder.json); a clear error when it is not an encoder run."""
    # path_kind: a name longer than the file system allows is one line, not an OSError
    if not path or path_kind(path, "the encoder run") != "dir":
        raise UserError(f"encoder run {short_path(path)} does not exist; pass a directory made "
                        "by `ssl-lab train` or `ssl-lab import` as ENCODER_RUN")
    if path_kind(Path(path) / "config.yaml", "the encoder run's config") != "file":
        raise UserError(f"{short_path(path)} is not an ssl-lab run directory (no config.yaml); "
                        "pass a directory made by `ssl-lab train` or `ssl-lab import` as "
                        "ENCODER_RUN")
    return read_spec(Path(path))


def encoder_channels(images: np.ndarray, in_chans: int) -> np.ndarray:
    """uint8 (N, H, W, C) with C matched to the encoder's input as evaluation matches it (grey
    repeated to RGB, RGB to luminance): an RCDM generates, shows and scores images in its
    encoder's input space, also for a 3-channel encoder (an imported ResNet) on grey data."""
    arr = np.asarray(images)
    if arr.shape[-1] == in_chans:
        return arr
    x = match_channels(torch.from_numpy(arr).permute(0, 3, 1, 2).float(), in_chans)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def make_encoder(cfg: RCDMConfig, enc_spec: dict, backbone: torch.nn.Module | None = None,
                 allow_import: bool = False) -> Encoder:
    """The frozen encoder (trained, or random-init); a wrapped module's run needs `backbone`."""
    if cfg.random_init:
        encoder = encoder_from_spec(enc_spec, seed=cfg.seed, backbone=backbone,
                                    allow_import=allow_import).eval()
    else:
        encoder = load_encoder(Path(cfg.encoder), backbone, allow_import)
    if cfg.layer not in encoder.feature_dims:
        raise UserError(f"layer={short(cfg.layer)} is not a layer of this encoder; choose one of "
                        f"{', '.join(encoder.layer_names)}")
    return encoder.requires_grad_(False)


def make_spec(cfg: RCDMConfig, enc_spec: dict, encoder: Encoder) -> dict:
    """rcdm.json: what rebuilds the model without the config (UNet shape, canvas, layer) and
    which encoder checkpoint its features came from."""
    content = cfg.unet.content or enc_spec["image_size"]
    if content > cfg.unet.size:
        raise UserError(f"unet.content={content} does not fit in unet.size={cfg.unet.size}; raise "
                        "unet.size or set unet.content smaller")
    found = None if cfg.random_init else ckpt_io.find_checkpoint(Path(cfg.encoder))
    return {"encoder": str(Path(cfg.encoder).resolve()), "encoder_checkpoint": str(found) if found
            else None, "layer": cfg.layer, "random_init": cfg.random_init, "seed": cfg.seed,
            "feature_dim": encoder.feature_dims[cfg.layer], "in_channels": enc_spec["in_chans"],
            "size": cfg.unet.size, "content": content, "channels": list(rcdm.parse_channels(
                cfg.unet.channels)), "layers_per_block": cfg.unet.layers_per_block,
            "attention": cfg.unet.attention, "norm_groups": cfg.unet.norm_groups,
            "dataset": enc_spec["dataset"]}


def make_model(spec: dict) -> rcdm.RCDM:
    unet = rcdm.build_unet(spec["size"], spec["in_channels"], spec["channels"],
                           spec["layers_per_block"], spec["attention"], spec["norm_groups"])
    return rcdm.RCDM(unet, spec["feature_dim"])


def encoder_data(cfg: RCDMConfig, fraction: float = 1.0, data: DatasetSplits | None = None
                 ) -> DatasetSplits:
    """The encoder's dataset, split exactly as the encoder run split it (or `data`, given in
    Python: ssl_lab.data.from_arrays / from_dataset)."""
    if data is not None:
        if fraction < 1:
            raise UserError("data.fraction subsamples a named dataset; with data= given, pass "
                            "the subset to train on (or set data.fraction=1)")
        return data
    enc_cfg = from_dict(read_yaml(Path(cfg.encoder) / "config.yaml"), Config)
    data = load_dataset(enc_cfg.data.name, enc_cfg.data.root,
                        val_fraction=enc_cfg.data.val_fraction, seed=enc_cfg.seed,
                        fraction=fraction)
    return data.select_target(enc_cfg.data.target)


# rcdm.json's keys that rebuild the model, and their types; the sizes are bounded since the
# model is allocated from them (a damaged file must not ask for terabytes)
SPEC_TYPES = {"layer": str, "dataset": str, "attention": bool, "feature_dim": int,
              "in_channels": int, "size": int, "content": int, "layers_per_block": int,
              "norm_groups": int, "channels": list}
MAX_SPEC_INT = 1 << 16


def read_spec_file(run_dir: Path) -> dict:
    """rcdm.json of a trained run, checked: a damaged file is one line naming it."""
    path, fix = Path(run_dir) / "rcdm.json", "train the RCDM again (`ssl-lab rcdm train`)"
    spec = read_json(path, "RCDM spec", fix)
    if not isinstance(spec, dict):
        raise UserError(f"{short_path(path)} is not a JSON object: the RCDM spec is damaged; {fix}")
    for key, kind in SPEC_TYPES.items():
        value = spec.get(key)
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if ok and kind is int:
            ok = 1 <= value <= MAX_SPEC_INT
        if ok and kind is list:
            ok = 1 <= len(value) <= 8 and all(
                isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_SPEC_INT
                for c in value)
        if not ok:
            raise UserError(f"{short_path(path)}: '{key}' is {short(value)}, not a valid "
                            f"{kind.__name__}: the RCDM spec is damaged; {fix}")
    return spec


def load_run(run_dir: Path) -> Built:
    """A trained RCDM run for sampling/scoring: the EMA weights and its encoder."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    spec = read_spec_file(run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    encoder = make_encoder(cfg, check_encoder_dir(cfg.encoder))
    model = make_model(spec)
    found = ckpt_io.find_checkpoint(run_dir)
    if found is None:
        raise UserError(f"no complete checkpoint in {run_dir}/checkpoints; train it first "
                        f"(ssl-lab rcdm train run.dir={run_dir} resume=true)")
    modules = {"ema": model} | ({"encoder": encoder} if cfg.random_init else {})
    ckpt_io.load_weights(found, modules)
    device = pick_device()
    return Built(cfg, spec, encoder.eval(), model.to(device).eval(), device,
                 resolve_precision(cfg.train.precision, device))


def features(built: Built, images: np.ndarray, desc: str = "features") -> torch.Tensor:
    """h(x) of uint8 images at the run's layer: float32 (N, D) on the CPU."""
    layer = built.spec["layer"]
    return extract_features(built.encoder, images, [layer], FEATURE_BATCH, built.device,
                            built.amp_dtype, desc=desc)[layer]
