"""Low-rank adaptation (Hu et al. 2022, "LoRA", Eq. 3): h = W x + (alpha / r) B A x with A [r, in] and
B [out, r] = 0 at the start, so a wrapped layer first equals the original and only A, B train.

Used for the auxiliary fake score psi of text-to-image runs (`model.fake_lora_rank`): psi then needs no
gradients or optimiser state for its full weights. No dependency on peft.
"""

from __future__ import annotations

from torch import nn

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers Attention projections


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):  # alpha: None = rank (scale 1)
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.down = nn.Linear(base.in_features, rank, **kw)  # A: nn.Linear's Kaiming-uniform init
        self.up = nn.Linear(rank, base.out_features, **kw)  # B: zero, so the layer starts as `base`
        nn.init.zeros_(self.up.weight)
        self.scale = float(alpha if alpha is not None else rank) / rank

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...] = ATTENTION_TARGETS) -> list[nn.Parameter]:
    """Freeze `model` and wrap every nn.Linear whose name ends with a target; returns the trainable params."""
    model.requires_grad_(False)
    names = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear named like {list(targets)} in {type(model).__name__} to put LoRA on")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank))
    return [p for p in model.parameters() if p.requires_grad]
