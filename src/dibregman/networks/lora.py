"""Low-rank adaptation (Hu et al. 2022, "LoRA", Eq. 3) through PEFT, the library diffusers loads LoRA weights with:
a wrapped layer computes h = W x + (alpha / r) B A x with A [r, in] Kaiming-uniform and B [out, r] = 0, so an adapted
network starts as its base and only A and B train. alpha = r (scale 1), no dropout.

Two users, one helper (`lora_copy`):
- the one-step student G (`model.student_lora_rank`): the layers of `STUDENT_TARGETS`, per network class (the
  UNet set is the one of DMD2's and LCM-LoRA's SD LoRAs: attention, feed-forward, resnet and resampling convolutions,
  time projection; transformers: joint attention and feed-forward; the native EDM U-Net: attention `qkv`/`proj`, the
  residual blocks' `conv1` and their embedding `affine`);
- the fake score psi (`model.fake_lora_rank`): the attention projections `PSI_TARGETS`, as before PEFT.

One frozen base. `lora_copy(net, ...)` adapts a copy of `net` whose frozen tensors ARE `net`'s (`FrozenShared`: a
deepcopy returns the same tensor, so the loop's EMA of G shares them too): teacher, G, its EMA and psi hold one copy
of the base weights (`share_base=False`: a copy of their own). There is no adapter switching: every adapted copy has
its own module tree around the shared tensors, so gradient checkpointing (which re-runs forwards during the backward
pass) always sees the right adapter.

State dicts of an adapted network hold its adapters only (`...lora_A.default.weight`, `...lora_B.default.weight`):
the base is the teacher's, read from the teacher spec; base keys handed to `load_state_dict` are ignored and missing
ones are not an error. Checkpoints of the hand-written LoRA that PEFT replaced (`<layer>.base.weight`,
`<layer>.down.weight` = A, `<layer>.up.weight` = B, the same maths) are migrated on load, and A is drawn in that
code's order (A, then a discarded draw for B, layer by layer), so a seeded run starts from the same weights.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import torch
from torch import nn

ADAPTER = "default"  # PEFT's adapter name inside a network (one adapter per network)
PSI_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers Attention projections
_FF = ("ff.net.0.proj", "ff.net.2")
_MMDIT = (*PSI_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", *_FF, "ff_context.net.0.proj",
          "ff_context.net.2")  # fmt: skip
STUDENT_TARGETS: dict[str, tuple[str, ...]] = {  # network class -> module-name suffixes adapted in a LoRA student
    "UNet2DConditionModel": (
        *PSI_TARGETS,
        "proj_in",
        "proj_out",
        *_FF,
        "conv1",
        "conv2",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "time_emb_proj",
    ),  # fmt: skip
    "UNet2DModel": (*PSI_TARGETS, "conv1", "conv2", "conv_shortcut", "time_emb_proj"),
    "SD3Transformer2DModel": _MMDIT,
    "FluxTransformer2DModel": (*_MMDIT, "proj_mlp"),
    "DiTTransformer2DModel": (*PSI_TARGETS, *_FF),
    "SongUNet": ("qkv", "proj", "conv1", "affine"),  # native EDM U-Net (`networks/unet.py`)
}


class FrozenShared(nn.Parameter):
    """A frozen weight held once by several networks (the teacher and its LoRA copies): deepcopy returns it."""

    def __deepcopy__(self, memo):
        memo[id(self)] = self
        return self


def _swap_params(net: nn.Module, make) -> None:
    """Replace every parameter p of net by make(p) (a tied parameter stays tied)."""
    done: dict[int, nn.Parameter] = {}
    for module in net.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = done.setdefault(id(p), make(p))


def share_frozen(net: nn.Module) -> nn.Module:
    """Freeze net in place and make its parameters `FrozenShared` (same storage): copies of net share them."""
    _swap_params(net, lambda p: p if isinstance(p, FrozenShared) else FrozenShared(p.detach(), requires_grad=False))
    return net


def full_copy(net: nn.Module) -> nn.Module:
    """A deepcopy of net that owns every weight (`FrozenShared` ones are copied too): a full-weight network."""
    out = copy.deepcopy(net)
    _swap_params(out, lambda p: nn.Parameter(p.detach().clone(), p.requires_grad) if isinstance(p, FrozenShared) else p)
    return out


def lora_root(net: nn.Module) -> nn.Module:
    """The network inside `net` that a LoRA student adapts: the first module of a class in `STUDENT_TARGETS`."""
    for module in net.modules():
        if type(module).__name__ in STUDENT_TARGETS:
            return module
    known = sorted(STUDENT_TARGETS)
    raise ValueError(f"model.student_lora_rank: no network to adapt in {type(net).__name__}; LoRA knows {known}")


def lora_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers of net by module name (empty for a network without adapters)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def is_adapted(net: nn.Module) -> bool:
    """True if net (or a module inside it) carries LoRA adapters from `add_lora`."""
    return any(getattr(m, "dibregman_lora", None) for m in net.modules())


def lora_copy(
    net: nn.Module,  # the frozen network to adapt (the teacher's), or a module holding it (native teachers)
    rank: int,  # r
    targets: tuple[str, ...] | None = None,  # module-name suffixes; None: STUDENT_TARGETS of the network's class
    *,
    share_base: bool = True,  # False: the copy owns its base weights (a second copy in memory)
) -> nn.Module:
    """A copy of net with LoRA adapters (rank r, alpha r) on `targets` of its `lora_root`; only they train."""
    out = copy.deepcopy(share_frozen(net)) if share_base else full_copy(net).float().requires_grad_(False)
    root = lora_root(out)
    add_lora(root, rank, targets or STUDENT_TARGETS[type(root).__name__])
    return out.eval()


def adapted_network(net: nn.Module) -> tuple[str, nn.Module]:
    """(name inside net, module) of the network that carries net's LoRA adapters; ValueError if none does."""
    for name, module in net.named_modules():
        if getattr(module, "dibregman_lora", None):
            return name, module
    raise ValueError(f"{type(net).__name__} has no LoRA adapters")


@functools.cache
def _edm_lora_layer() -> type:
    """PEFT's custom-layer hook for the EDM U-Net's own `Linear` and k x k `Conv2d` (which PEFT's classes cannot
    rebuild): A = Linear(in, r) or Conv2d(in, r, k, padding k // 2), B = Linear(r, out) or a 1x1 Conv2d, and
    h = base(x) + (alpha / r) B A x."""
    from peft.tuners.lora import LoraLayer

    class EDMLoraLayer(nn.Module, LoraLayer):
        def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, r: int = 0, lora_alpha: int = 1,
                     **kwargs):  # fmt: skip
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return int(module.weight.shape[1]), int(module.weight.shape[0])

        def update_layer(self, adapter_name: str, r: int, lora_alpha: int, **kwargs) -> None:
            base, (n_in, n_out) = self.get_base_layer(), (self.in_features, self.out_features)
            if base.weight.dim() == 4:
                if getattr(base, "up", False) or getattr(base, "down", False):
                    raise ValueError("LoRA on a resampling convolution of the EDM U-Net is not supported")
                k = int(base.weight.shape[-1])
                a, b = nn.Conv2d(n_in, r, k, padding=k // 2, bias=False), nn.Conv2d(r, n_out, 1, bias=False)
            else:
                a, b = nn.Linear(n_in, r, bias=False), nn.Linear(r, n_out, bias=False)
            nn.init.zeros_(b.weight)
            self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
            self.scaling[adapter_name] = lora_alpha / r
            self.lora_dropout[adapter_name] = nn.Identity()
            self.lora_A[adapter_name], self.lora_B[adapter_name] = a.to(base.weight.device), b.to(base.weight.device)
            self.set_adapter(self.active_adapters)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name in self.lora_A:
                    a, b = self.lora_A[name], self.lora_B[name]
                    result = result + (b(a(x.to(a.weight.dtype))) * self.scaling[name]).to(result.dtype)
            return result

    return EDMLoraLayer


def _config(rank: int, targets: tuple[str, ...]):
    from peft import LoraConfig

    from . import unet

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=True)
    config._register_custom_module({unet.Linear: _edm_lora_layer(), unet.Conv2d: _edm_lora_layer()})
    return config


def add_lora(net: nn.Module, rank: int, targets: tuple[str, ...]) -> nn.Module:
    """Inject PEFT LoRA adapters into net in place (only they train); returns net. ValueError if nothing matches."""
    from peft import inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rng = torch.get_rng_state()
    with warnings.catch_warnings():  # PEFT warns about the EDM U-Net's own layer classes (handled in _config)
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        try:
            inject_adapter_in_model(_config(rank, targets), net, adapter_name=ADAPTER)
        except ValueError as e:
            raise ValueError(
                f"no layer named like {list(targets)} in {type(net).__name__} to put LoRA on ({e})"
            ) from None
    torch.set_rng_state(rng)
    with torch.no_grad():
        for layer in lora_layers(net).values():  # the pre-PEFT draws: A, then a discarded one for B (zero)
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            b.zero_()
    for name, p in net.named_parameters():
        if ".lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable adapters in float32 on a lower-precision base
    net.dibregman_lora = {"rank": rank, "alpha": rank, "targets": list(targets)}
    net.register_state_dict_post_hook(_keep_adapters)
    net.register_load_state_dict_pre_hook(_migrate_and_drop_base)
    net.register_load_state_dict_post_hook(_base_is_not_missing)
    return net


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key or key.startswith(("lora_A.", "lora_B."))


def _keep_adapters(module, state_dict, prefix, local_metadata) -> None:
    """State dict post-hook: drop the base weights (the teacher's) under prefix, keep the adapters."""
    for key in [k for k in state_dict if k.startswith(prefix) and not is_adapter_key(k[len(prefix) :])]:
        del state_dict[key]


OLD_KEYS = {".down.weight": f".lora_A.{ADAPTER}.weight", ".up.weight": f".lora_B.{ADAPTER}.weight"}


def _migrate_and_drop_base(module, state_dict, prefix, *args) -> None:
    """Load pre-hook: rename pre-PEFT adapter keys (down = A, up = B), drop base keys (the teacher's weights)."""
    layers = set(lora_layers(module))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        old = next((s for s in OLD_KEYS if rest.endswith(s) and rest[: -len(s)] in layers), None)
        if old is not None:
            state_dict[prefix + rest[: -len(old)] + OLD_KEYS[old]] = state_dict.pop(key)
        elif not is_adapter_key(rest):
            del state_dict[key]
    module._dibregman_load_prefix = prefix


def _base_is_not_missing(module, incompatible_keys) -> None:
    """Load post-hook: the base weights are not expected in a state dict (they are the teacher's)."""
    prefix = getattr(module, "_dibregman_load_prefix", "")
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith(prefix) and not is_adapter_key(k[len(prefix) :]))]


def adapter_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of an adapted network in PEFT's saved form (`<layer>.lora_A.weight`, no adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=ADAPTER).items()}


def load_adapter_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict`-form weights into an adapted network; ValueError naming what does not match."""
    named = {k.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): v
             for k, v in state.items()}  # fmt: skip
    own = {k for k in net.state_dict()}
    missing, unexpected = sorted(own - set(named)), sorted(set(named) - own)
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.load_state_dict(named)


def lora_parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for n, p in net.named_parameters() if ".lora_" in n)


__all__ = [
    "ADAPTER",
    "PSI_TARGETS",
    "STUDENT_TARGETS",
    "FrozenShared",
    "share_frozen",
    "full_copy",
    "lora_root",
    "lora_copy",
    "add_lora",
    "lora_layers",
    "is_adapted",
    "adapted_network",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "lora_parameter_count",
]
