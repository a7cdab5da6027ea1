"""Native EDM teachers: our exported U-Nets, and weights imported from official EDM checkpoints.

Our `EDMDenoiser` (networks/unet.py) has the parameter names of EDM's `EDMPrecond` + `SongUNet` (Karras et
al. 2022, DDPM++ configuration), so EDM weights load with `strict=True` once they are out of EDM's pickles.
Those pickles contain code (EDM's `torch_utils.persistence`) and are never opened here. Export the weights
where EDM's own repository is installed (only the DDPM++ "-vp" networks are supported: SongUNet, positional
embedding, standard encoder/decoder, [1, 1] resampling filter):

    python -c "import pickle,torch,json,dnnlib; \
      net=pickle.load(dnnlib.util.open_url('edm-cifar10-32x32-uncond-vp.pkl'))['ema']; \
      torch.save(net.state_dict(),'edm_sd.pt'); \
      json.dump(net.init_kwargs, open('edm_kwargs.json','w'), default=list)"

(`init_kwargs` is recorded by EDM's persistent classes: the keyword arguments EDMPrecond was built with.) Then

    dibregman import-edm edm_sd.pt edm_kwargs.json --out teacher.safetensors

reads the state dict with `torch.load(..., weights_only=True)` (tensors only), maps the kwargs onto
`UNetConfig`, loads strictly and writes our safetensors + JSON, which `load_edm_teacher` (and
`load_teacher("edm:...")`) read.
EDM's augmentation-label layer (`model.map_augment.weight`, present when trained with augment_dim > 0) is
dropped: it is only used with augmentation labels during training, never when sampling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..networks.unet import EDMDenoiser, UNetConfig, build_unet

# EDM's SongUNet defaults (training/networks.py), used for keys absent from init_kwargs.
_SONGUNET_DEFAULTS = dict(
    model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16],
    dropout=0.10, label_dropout=0.0, augment_dim=0,
    embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
    resample_filter=[1, 1],
)  # fmt: skip
# What our U-Net implements; anything else is a different architecture.
_REQUIRED = dict(
    model_type="SongUNet", embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
    decoder_type="standard", resample_filter=[1, 1],
)  # fmt: skip
_COPIED = ("img_resolution", "label_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
           "attn_resolutions", "dropout", "label_dropout", "sigma_data")  # fmt: skip
_IGNORED = ("use_fp16", "augment_dim", "class_name", "out_channels")


def load_edm_teacher(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> EDMDenoiser:
    """Load an exported native teacher (`.safetensors` + `.json`) as an `EDMDenoiser` in eval mode."""
    state, meta = ckpt.load_safetensors(path)
    if "unet" not in meta:
        raise ValueError(f"{path}: no U-Net config in its JSON/metadata; is this a dibregman teacher export?")
    if meta.get("kind") == "flow-unet":
        raise ValueError(f"{path} is a rectified-flow teacher; load it as flow:{path}")
    net = load_unet_weights(build_unet(UNetConfig.from_dict(meta["unet"])), state, path)
    return net.eval().requires_grad_(False).to(device)


def load_unet_weights(net: torch.nn.Module, state: dict, path) -> torch.nn.Module:
    """`net` with an export's weights loaded strictly; a ValueError naming the file when they do not fit."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the U-Net config in its JSON: {e}") from e
    return net


def edm_kwargs_to_config(kwargs: dict) -> UNetConfig:
    """Map EDM `EDMPrecond` init kwargs onto our `UNetConfig`; ValueError for architectures we lack."""
    kw = {**_SONGUNET_DEFAULTS, "model_type": "DhariwalUNet", **kwargs}  # DhariwalUNet = EDMPrecond's default
    for key, want in _REQUIRED.items():
        got = list(kw[key]) if isinstance(kw[key], tuple) else kw[key]
        if got != want:
            raise ValueError(
                f"EDM network with {key}={got!r} is not supported: only DDPM++ ('-vp') networks "
                f"({', '.join(f'{k}={v!r}' for k, v in _REQUIRED.items())}) map onto our U-Net"
            )
    if "img_channels" not in kw and "in_channels" not in kw:
        raise ValueError("EDM kwargs need img_channels (EDMPrecond) or in_channels (SongUNet)")
    channels = int(kw.get("img_channels", kw.get("in_channels")))
    if int(kw.get("out_channels", channels)) != channels:
        raise ValueError(f"out_channels={kw['out_channels']} differs from img_channels={channels}: not a denoiser")
    if "img_resolution" not in kw:
        raise ValueError("EDM kwargs need img_resolution")
    known = set(_SONGUNET_DEFAULTS) | set(_REQUIRED) | set(_COPIED) | set(_IGNORED)
    known |= {"img_channels", "in_channels", "sigma_min", "sigma_max"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown EDM kwargs {unknown}; understood: {sorted(known)}")
    cfg = {k: kw[k] for k in _COPIED if k in kw}
    cfg["img_channels"] = channels
    sigma_min, sigma_max = float(kw.get("sigma_min", 0.0)), float(kw.get("sigma_max", float("inf")))
    cfg["sigma_min"] = sigma_min if sigma_min > 0 else 0.002  # EDMPrecond's 0 / inf mean "no limit"
    cfg["sigma_max"] = sigma_max if sigma_max < float("inf") else 80.0
    return UNetConfig.from_dict(cfg)


def import_edm_state_dict(
    state_dict_path: str | os.PathLike,  # torch.save'd EDMPrecond state_dict (tensors only)
    init_json_path_or_dict: str | os.PathLike | dict,  # EDMPrecond init_kwargs as a JSON file or a dict
    out_path: str | os.PathLike,  # where to write <out>.safetensors + <out>.json
) -> Path:
    """Convert an official EDM (DDPM++) network into our safetensors + JSON; returns the .safetensors path."""
    state_dict_path = Path(state_dict_path)
    if not state_dict_path.is_file():
        raise FileNotFoundError(f"EDM state dict not found: {state_dict_path}")
    kwargs = init_json_path_or_dict
    if not isinstance(kwargs, dict):
        json_path = Path(kwargs)
        if not json_path.is_file():
            raise FileNotFoundError(f"EDM kwargs JSON not found: {json_path}")
        try:
            kwargs = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path} is not valid JSON: {e}") from e
        if not isinstance(kwargs, dict):
            raise ValueError(f"{json_path} must hold a JSON object of init_kwargs, not a {type(kwargs).__name__}")
    cfg = edm_kwargs_to_config(kwargs)
    try:
        state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled network (code) or a corrupt file
        raise ValueError(
            f"{state_dict_path} is not a plain state dict of tensors ({type(e).__name__}); "
            "export it with `torch.save(net.state_dict(), ...)` as shown in dibregman.teachers.edm"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{state_dict_path} holds a {type(state).__name__}, not a state dict")
    if state and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}  # a bare SongUNet state dict
    state = {k: v for k, v in state.items() if k != "model.map_augment.weight"}
    net = EDMDenoiser(cfg)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{state_dict_path} holds non-tensor values, not a state dict of tensors")
    problem = ckpt.describe_mismatch(state, net.state_dict())
    if problem:
        raise ValueError(f"{state_dict_path} does not match the architecture from its kwargs ({problem})")
    net.load_state_dict(state, strict=True)
    meta = {
        "kind": "edm-unet",
        "unet": cfg.to_dict(),
        "source": {"edm_kwargs": kwargs, "file": str(state_dict_path)},
    }
    return ckpt.export_safetensors(net.state_dict(), meta, out_path)


__all__ = ["load_edm_teacher", "import_edm_state_dict", "edm_kwargs_to_config"]
