"""EDM-preconditioned DDPM++ U-Net (Karras et al. 2022, "Elucidating the design space", Table 1 and App. F).

The module tree and parameter names follow EDM's `SongUNet` inside `EDMPrecond` (`model.enc.32x32_conv.weight`,
`model.enc.16x16_block0.conv0.weight`, `model.map_layer0.weight`, ...), so a state dict exported from an official
EDM pickle loads with `load_state_dict(strict=True)` (see `dibregman import-edm`). The code is our own.

Symbols: x_t = x0 + sigma * eps (EDM / VE parametrisation), sigma_data = data standard deviation,
D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Eq. 7), c_noise = ln(sigma) / 4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..noise import edm_preconditioning


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the DDPM++ U-Net; the defaults are EDM's CIFAR-10 `ddpmpp` configuration."""

    img_resolution: int = 32  # input/output side length in pixels
    img_channels: int = 3  # colour channels
    label_dim: int = 0  # number of classes, 0 = unconditional
    model_channels: int = 128  # base channel count
    channel_mult: tuple[int, ...] = (2, 2, 2)  # channel multiplier per resolution
    channel_mult_emb: int = 4  # embedding width = model_channels * channel_mult_emb
    num_blocks: int = 4  # residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (16,)  # resolutions with self-attention
    dropout: float = 0.13  # dropout probability inside residual blocks
    label_dropout: float = 0.0  # probability of dropping the class label (classifier-free guidance)
    sigma_data: float = 0.5  # expected standard deviation of the training data
    sigma_min: float = 0.002  # smallest supported noise level
    sigma_max: float = 80.0  # largest supported noise level

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        for key in ("channel_mult", "attn_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


# Named sizes: tiny for tests (48 k parameters), mnist for the shipped teacher (0.32 M, chosen by measured CPU
# throughput: 280 train img/s on 2 cores), cifar10 = EDM's DDPM++ (55.7 M parameters).
UNET_PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(
        img_resolution=8,
        img_channels=1,
        model_channels=8,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
    ),
    "mnist": UNetConfig(
        img_resolution=28,
        img_channels=1,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_blocks=1,
        attn_resolutions=(7,),
        dropout=0.0,
    ),
    "cifar10": UNetConfig(),
}


def _xavier(shape: list[int], fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1) * gain


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(_xavier([out_features, in_features], in_features, out_features, gain))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """3x3/1x1 convolution with optional 2x up/down-sampling by the [1, 1] box filter (DDPM++)."""

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False, gain: float = 1.0):
        super().__init__()
        self.cin, self.cout, self.up, self.down = cin, cout, up, down
        fan_in, fan_out = cin * kernel * kernel, cout * kernel * kernel
        self.weight = nn.Parameter(_xavier([cout, cin, kernel, kernel], fan_in, fan_out, gain)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(cout)) if kernel else None
        f = torch.ones(2)
        f = torch.outer(f, f)[None, None] / f.sum().square()  # [1, 1, 2, 2]
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            f = self.resample_filter.to(x.dtype).mul(4).tile(x.shape[1], 1, 1, 1)
            x = F.conv_transpose2d(x, f, groups=x.shape[1], stride=2)
        if self.down:
            f = self.resample_filter.to(x.dtype).tile(x.shape[1], 1, 1, 1)
            x = F.conv2d(x, f, groups=x.shape[1], stride=2)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, self.bias.to(x.dtype), padding=w.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    def __init__(self, num_channels: int, num_groups: int = 32, min_per_group: int = 4, eps: float = 1e-6):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (DDPM++): norm-act-conv, additive embedding, norm-act-dropout-conv, optional attention."""

    def __init__(self, cin: int, cout: int, emb: int, *, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = cin, cout, dropout
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
        self.affine = Linear(emb, cout)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3, gain=1e-5)
        self.skip = Conv2d(cin, cout, 1, up=up, down=down) if (cin != cout or up or down) else None
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(cout)
            self.qkv = Conv2d(cout, cout * 3, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(cout, cout, 1, gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.attention:
            n, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, hh * ww).unbind(2)  # [N, C, HW] each
            w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c)).softmax(dim=2).to(q.dtype)
            a = torch.einsum("nqk,nck->ncq", w, v).reshape(n, c, hh, ww)
            x = (self.proj(a) + x) * math.sqrt(0.5)
        return x


class SongUNet(nn.Module):
    """DDPM++ U-Net F(x, c_noise, labels) with EDM's module names; `encode` exposes the bottleneck features."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, res0 = cfg.model_channels, cfg.img_resolution
        emb = mc * cfg.channel_mult_emb
        self.label_dropout, self.noise_channels = cfg.label_dropout, mc
        self.map_label = Linear(cfg.label_dim, mc) if cfg.label_dim else None
        self.map_layer0 = Linear(mc, emb)
        self.map_layer1 = Linear(emb, emb)
        block = dict(emb=emb, dropout=cfg.dropout)

        self.enc = nn.ModuleDict()
        cout = cfg.img_channels
        for level, mult in enumerate(cfg.channel_mult):
            res = res0 >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, mc, 3)
                cout = mc
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, mc * mult
                attn = res in cfg.attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        skips = [m.out_channels if isinstance(m, UNetBlock) else m.cout for m in self.enc.values()]
        self.feature_channels = cout

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = res0 >> level
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), mc * mult
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, cfg.img_channels, 3, gain=1e-5)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        half = self.noise_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, device=c_noise.device, dtype=torch.float32) / (half - 1))
        ang = c_noise.float()[:, None] * freqs[None]  # [N, half]
        e = torch.cat([ang.sin(), ang.cos()], dim=1)  # EDM's positional embedding with sin/cos swapped
        if self.map_label is not None and labels is not None:
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            e = e + self.map_label(labels * math.sqrt(self.map_label.in_features))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(e))))

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return x, skips

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, labels)
        x, skips = self.encode(x, emb)
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


def label_input(cond: torch.Tensor | None, label_dim: int, n: int, device) -> torch.Tensor | None:
    """The U-Net's class input: None when unconditional, zeros for no label, one-hot for class indices [N], else
    the given [N, label_dim] (e.g. soft labels)."""
    if not label_dim:
        return None
    if cond is None:
        return torch.zeros(n, label_dim, device=device)
    if cond.dtype in (torch.int64, torch.int32) or cond.ndim == 1:
        return F.one_hot(cond.long(), label_dim).float()
    return cond.float()


class EDMDenoiser(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1): D(x, sigma, cond) -> x0_hat. Same keys as `EDMPrecond`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.sigma_data, self.sigma_min, self.sigma_max = cfg.sigma_data, cfg.sigma_min, cfg.sigma_max
        self.label_dim = cfg.label_dim
        self.model = SongUNet(cfg)
        self.feature_channels = self.model.feature_channels  # width of `features()`

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.cfg.img_channels, self.cfg.img_resolution, self.cfg.img_resolution)

    def _sigma(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """A float or [N] sigma as [N, 1, 1, 1] float32 on x's device."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        return sigma.expand(x.shape[0], 1, 1, 1)

    def _labels(self, cond: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
        return label_input(cond, self.label_dim, n, device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        c_skip, c_out, c_in, c_noise = edm_preconditioning(self._sigma(sigma, x), self.sigma_data)
        f = self.model(c_in * x, c_noise.flatten(), self._labels(cond, x.shape[0], x.device))
        return c_skip * x + c_out * f.float()

    def features(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Bottleneck feature map of the encoder, [N, C_feat, H_min, W_min] (for a discriminator head)."""
        _, _, c_in, c_noise = edm_preconditioning(self._sigma(sigma, x), self.sigma_data)
        emb = self.model.embed(c_noise.flatten(), self._labels(cond, x.shape[0], x.device))
        return self.model.encode(c_in * x.float(), emb)[0]


def build_unet(preset_or_cfg: str | UNetConfig | dict = "mnist", **overrides) -> EDMDenoiser:
    """Build an EDM denoiser from a preset name (`tiny`, `mnist`, `cifar10`), a config or a dict."""
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {preset_or_cfg!r}; valid: {sorted(UNET_PRESETS)}")
        cfg = UNET_PRESETS[preset_or_cfg]
    elif isinstance(preset_or_cfg, dict):
        cfg = UNetConfig.from_dict(preset_or_cfg)
    else:
        cfg = preset_or_cfg
    if overrides:
        cfg = UNetConfig.from_dict({**cfg.to_dict(), **overrides})
    return EDMDenoiser(cfg)


__all__ = ["UNetConfig", "UNET_PRESETS", "EDMDenoiser", "SongUNet", "build_unet"]
