"""The networks `dibregman plan` sizes: published diffusers/transformers configurations of SD1.5, SDXL, SD3-medium
and FLUX.1-dev, and the native networks of the presets, built on any device (the meta device: shapes only, no
weights, no download) behind the one interface of Algorithm 1's networks, `D(x, sigma) -> x0_hat` with
`features(x, sigma)` for the discriminator head.

Each config dict is the `config.json` of the model's diffusers folder on the Hugging Face Hub (keys at their
defaults left out), as named above it. `TextNet` runs a text-to-image network on zero text embeddings of the
published shapes: enough to count parameters and the tensors a forward pass keeps, not to denoise.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

# huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (859.5 M parameters)
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)  # fmt: skip
# huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.567 B parameters)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
    layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)  # fmt: skip
# huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (2.028 B parameters)
SD3_MEDIUM = dict(
    attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
    num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
    pos_embed_max_size=192, sample_size=128,
)  # fmt: skip
# huggingface.co/black-forest-labs/FLUX.1-dev transformer/config.json (11.90 B parameters)
FLUX1_DEV = dict(
    attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=True, in_channels=64,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
    pooled_projection_dim=768,
)  # fmt: skip
# vae/config.json of SD1.5 and SDXL (same architecture, 83.65 M) and of SD3 / FLUX.1 (16 latent channels)
VAE_SD = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=4,
              layers_per_block=2, up_block_types=["UpDecoderBlock2D"] * 4)  # fmt: skip
VAE_16 = {**VAE_SD, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
# text_encoder/config.json: CLIP ViT-L/14 (SD1.5, SDXL, FLUX.1), OpenCLIP ViT-bigG/14 (SDXL and SD3
# text_encoder_2), T5 v1.1 XXL encoder (SD3 text_encoder_3, FLUX.1 text_encoder_2)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)  # fmt: skip

# The blocks a family checkpoints and shards one at a time (diffusers' gradient checkpointing wraps exactly the
# ResnetBlock2D and transformer blocks; our U-Net's UNetBlock; an MLP has none).
UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock",
                "FluxSingleTransformerBlock", "UNetBlock")  # fmt: skip


class TextNet(nn.Module):
    """D(x, sigma) of a diffusers text-to-image network on zero text embeddings of its published shapes; `features`
    runs it up to the discriminator's tap (a UNet's mid block, a transformer's block at `feature_depth`)."""

    def __init__(self, net: nn.Module, kind: str, text: tuple[int, int], pooled: int = 0, feature_depth: float = 0.5):
        super().__init__()
        self.net, self.kind, self.text, self.pooled = net, kind, text, pooled  # text: (tokens, width)
        c = net.config
        if kind == "unet":
            self.feature_channels = int(c.block_out_channels[-1])
            tap = net.mid_block
        else:
            from .teachers.latent import block_at_depth

            blocks = [*net.transformer_blocks, *getattr(net, "single_transformer_blocks", [])]
            self.feature_channels = int(c.num_attention_heads * c.attention_head_dim)
            tap = block_at_depth(blocks, feature_depth)
        self._tap = [tap]  # a reference, not a second registration of the block

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        b = x.shape[0]
        t = torch.full((b,), 0.5, device=x.device)  # the network's time input; memory does not depend on it
        emb = x.new_zeros(b, *self.text)  # [b, tokens, width] text embedding
        if self.kind == "unet":
            extra = {}
            if self.net.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
                extra["added_cond_kwargs"] = {"text_embeds": x.new_zeros(b, self.pooled), "time_ids": x.new_zeros(b, 6)}
            return self.net(x, t * 1000, encoder_hidden_states=emb, **extra).sample
        pooled = x.new_zeros(b, self.pooled)
        if self.kind == "sd3":
            out = self.net(hidden_states=x, timestep=t * 1000, encoder_hidden_states=emb, pooled_projections=pooled)
            return out.sample
        from .teachers.flux import image_ids, pack_latents, unpack_latents

        h, w = x.shape[2:]
        guidance = t if self.net.config.guidance_embeds else None
        out = self.net(hidden_states=pack_latents(x), timestep=t, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=emb, txt_ids=x.new_zeros(self.text[0], 3),
                       img_ids=image_ids(h // 2, w // 2, x.device, x.dtype), return_dict=False)[0]  # fmt: skip
        return unpack_latents(out, h, w)

    def features(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """[N, C, h, w] (UNet bottleneck) or [N, D, tokens] (the image tokens after the tap block)."""
        from .teachers.latent import image_tokens, run_to_block

        out = run_to_block(self._tap[0], lambda: self.forward(x, sigma))
        if self.kind == "unet":
            return out[0] if isinstance(out, tuple) else out
        return image_tokens(out).transpose(1, 2)


@dataclass
class Arch:
    """What the planner knows of a teacher: its network, the frozen parts beside it, the sample shape."""

    title: str  # e.g. "SD1.5 UNet (UNet2DConditionModel)"
    source: str  # where its configuration comes from
    network: nn.Module  # the teacher's network: G and psi are copies of it (Algorithm 1, line 1)
    shape: tuple[int, ...]  # one sample [C, H, W] (latent for text-to-image) or [D]
    encoders: dict[str, nn.Module] = field(default_factory=dict)  # frozen VAE / text encoders (text-to-image)
    text_to_image: bool = False  # LoRA on psi and the teacher's bf16 switch apply
    note: str = ""


def _diffusers(cls_name: str, cfg: dict) -> nn.Module:
    import diffusers

    return getattr(diffusers, cls_name)(**cfg)


def _encoders(vae: dict, *clips: tuple[str, dict], t5: bool = False, build: bool = True) -> dict[str, nn.Module]:
    if not build:
        return {}
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = {"vae": AutoencoderKL(**vae)}
    for name, (kind, cfg) in zip(("text_encoder", "text_encoder_2"), clips, strict=False):
        cls = CLIPTextModelWithProjection if kind == "proj" else CLIPTextModel
        out[name] = cls(CLIPTextConfig(**cfg))
    if t5:
        out["text_encoder_t5"] = T5EncoderModel(T5Config(**T5_XXL))
    return out


def published(name: str, feature_depth: float = 0.5, encoders: bool = True) -> Arch:
    """sd15 | sdxl | sd3 | flux: the published network and (unless encoders=False) its frozen VAE and text encoders,
    built on the current device."""
    hub = "huggingface.co/"
    if name == "sd15":
        net = TextNet(_diffusers("UNet2DConditionModel", SD15_UNET), "unet", (77, 768))
        return Arch("SD1.5 UNet (UNet2DConditionModel)", hub + "stable-diffusion-v1-5/stable-diffusion-v1-5", net,
                    (4, 64, 64), _encoders(VAE_SD, ("plain", CLIP_L), build=encoders), True)  # fmt: skip
    if name == "sdxl":
        net = TextNet(_diffusers("UNet2DConditionModel", SDXL_UNET), "unet", (77, 2048), pooled=1280)
        return Arch("SDXL base 1.0 UNet (UNet2DConditionModel)", hub + "stabilityai/stable-diffusion-xl-base-1.0",
                    net, (4, 128, 128), _encoders(VAE_SD, ("plain", CLIP_L), ("proj", CLIP_BIGG), build=encoders), True,
                    note="size only: the sd family does not load SDXL pipelines (second text encoder, added "
                    "conditions) today")  # fmt: skip
    if name == "sd3":
        net = TextNet(_diffusers("SD3Transformer2DModel", SD3_MEDIUM), "sd3", (77 + 256, 4096), 2048, feature_depth)
        enc = _encoders(VAE_16, ("proj", CLIP_L), ("proj", CLIP_BIGG), t5=True, build=encoders)
        source = hub + "stabilityai/stable-diffusion-3-medium-diffusers"
        return Arch("SD3-medium transformer (SD3Transformer2DModel)", source, net, (16, 128, 128), enc, True)
    if name == "flux":
        net = TextNet(_diffusers("FluxTransformer2DModel", FLUX1_DEV), "flux", (512, 4096), 768, feature_depth)
        enc = _encoders(VAE_16, ("plain", CLIP_L), t5=True, build=encoders)
        return Arch("FLUX.1-dev transformer (FluxTransformer2DModel)", hub + "black-forest-labs/FLUX.1-dev", net,
                    (16, 128, 128), enc, True)  # fmt: skip
    raise ValueError(f"unknown published model {name!r}; valid: {list(PUBLISHED)}")


PUBLISHED = ("sd15", "sdxl", "sd3", "flux")


def native(spec: str, cfg, size: str | None = None) -> Arch:
    """The network of a native teacher spec (an `edm:` U-Net from the JSON beside its weights, else the named size
    `size` of `UNET_PRESETS`; `gmm:` the MLP copy that `build.pretrain_mlp` fits), built on the current device
    without reading weights."""
    import json
    from pathlib import Path

    from .networks.unet import UNET_PRESETS, UNetConfig, build_unet
    from .teachers import resolve_path

    kind, _, arg = resolve_path(spec).partition(":")
    if kind == "gmm":
        from .networks.mlp import MLPConfig, MLPDenoiser
        from .teachers import load_teacher

        with torch.device("cpu"):  # analytic: no parameters, cheap; its checks read values
            t = load_teacher(spec)
        m = cfg.model
        mlp = MLPConfig(dim=int(t.shape[0]), hidden=m.mlp_hidden, depth=m.mlp_depth, sigma_data=t.sigma_data,
                        sigma_min=t.sigma_min, sigma_max=t.sigma_max)  # fmt: skip
        return Arch(f"MLP denoiser {mlp.depth} x {mlp.hidden} (analytic teacher {spec})", "build.pretrain_mlp",
                    MLPDenoiser(mlp), tuple(t.shape), note="the teacher is exact: no parameters")  # fmt: skip
    if kind != "edm":
        raise ValueError(f"dibregman plan sizes edm:, gmm:, sd:, sd3: and flux: teachers, not {kind}:")
    meta = Path(arg).with_suffix(".json")
    if meta.is_file():
        unet, source = UNetConfig.from_dict(json.loads(meta.read_text())["unet"]), str(meta)
    elif size in UNET_PRESETS:
        unet, source = UNET_PRESETS[size], f"networks/unet.py UNET_PRESETS[{size!r}] ({meta.name} not present)"
    else:
        raise FileNotFoundError(f"{meta} not found: the planner reads the U-Net config of {spec} from it")
    net = build_unet(unet)
    return Arch(f"DDPM++ U-Net {unet.img_resolution}px, {unet.model_channels} channels", source, net, net.shape)


def arch_for(spec: str, cfg, size: str | None = None) -> Arch:
    """The `Arch` of a preset's teacher spec: text-to-image kinds take the local folder's network config when it
    exists, else the published one of that family."""
    from pathlib import Path

    kind, _, arg = spec.partition(":")
    family = {"sd": "sd15", "sd3": "sd3", "flux": "flux"}.get(kind)
    if family is None:
        return native(spec, cfg, size)
    feature_depth = cfg.model.feature_depth
    arch = published(family, feature_depth)
    sub = "unet" if kind == "sd" else "transformer"
    local = Path(arg) / sub / "config.json"
    if local.is_file():  # the user's own checkpoint: its network, the published encoders
        import diffusers

        cls = type(arch.network.net)
        cfg_local = cls.load_config(str(local.parent))
        arch.network = TextNet(getattr(diffusers, cls.__name__).from_config(cfg_local), arch.network.kind,
                               arch.network.text, arch.network.pooled, feature_depth)  # fmt: skip
        arch.source = str(local)
    return arch


def count(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `module` (each tensor once), optionally only those requiring gradients."""
    seen = {id(p): p for p in module.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad or not trainable_only)


def buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def units(module: nn.Module) -> list[nn.Module]:
    """The blocks of `module` that are checkpointed and sharded one at a time (`UNIT_CLASSES`), outermost only."""
    found: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if type(child).__name__ in UNIT_CLASSES:
                found.append(child)
            else:
                walk(child)

    walk(module)
    return found


def latent_side(pixels: int, factor: int = 8) -> int:
    """Latent side of a `pixels` image (VAE factor 8), a multiple of 2 (transformer patches)."""
    return max(2, 2 * math.ceil(pixels / factor / 2))


def student_lora_counts(net: nn.Module, cfg) -> tuple[int | None, int]:
    """(parameters G trains, parameters of G's own frozen base) of a LoRA student (`model.student_lora_rank`: the
    adapters of `networks.lora.STUDENT_TARGETS` on the teacher's weights, or on a frozen copy of its own when
    `model.share_lora_base` is off); (None, 0) for a full-weight student."""
    rank = cfg.model.student_lora_rank
    if not rank:
        return None, 0
    from .networks.lora import STUDENT_TARGETS, add_lora, lora_parameter_count, lora_root

    root = copy.deepcopy(lora_root(net))
    add_lora(root, rank, STUDENT_TARGETS[type(root).__name__])
    return lora_parameter_count(root), (0 if cfg.model.share_lora_base else count(net))


__all__ = [
    "Arch", "TextNet", "PUBLISHED", "published", "native", "arch_for", "count", "units", "UNIT_CLASSES",
    "student_lora_counts",
]  # fmt: skip
