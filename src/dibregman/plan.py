"""`dibregman plan`: the GPU memory per rank of Di-Bregman distillation (Algorithm 1) under `run.parallel` = none,
ddp or fsdp, from parameter counts and an activation count taken on the meta device (no weights, no network), and
which settings fit a GPU of a given size.

Symbols: P_T teacher, P_G generator, P_psi fake score (P_psi' its trainable part: all of it, or its LoRA factors),
P_h the discriminator head, P_E the frozen VAE and text encoders; W ranks (W = 1 for none: one process, one GPU);
b = ceil(batch / (accum W)) samples per rank and micro-batch. Per rank, in bytes:
  teacher          P_T (2 in bf16, else 4); fsdp: / W (sharded, gathered block by block for inference)
  encoders         P_E in the teacher's dtype, replicated (prompts are encoded at every step)
  weights          4 (P_G + P_psi + P_h): fp32 masters (a LoRA psi keeps its frozen base in fp32); fsdp: / W
  EMA              4 P_G (the EMA generator); fsdp: / W
  AdamW            8 (P_G + P_psi' + P_h): exp_avg and exp_avg_sq; fsdp: / W
  gradients        fp32 of the network the phase trains: none max over phases (set_to_none frees them after each
                   step); ddp 4 (P_G + P_psi' + P_h) (the reducer's buckets persist, gradient_as_bucket_view); fsdp / W
  activations      `plan_trace` (read its docstring) of the passes with gradients, counted at one sample, x b:
                   generator phase G(z) [+ psi's features with x's gradient for the GAN term],
                   critic phase psi(x) + 2 psi.features (Eq. 5's real and fake logits)
  no-grad passes   generator phase: the larger working set (`plan_trace.working_set`, x b) of the teacher at x_t
                   (twice the samples under classifier-free guidance) and psi at x_t, alive beside G's activations
  autocast copies  bf16 autocast (none, ddp): 2 (P_G + P_psi), the bf16 weight copies autocast caches until the round
                   ends and the backward keeps
  step scratch     foreach AdamW: one fp32 temporary of the stepped network's trainable part; fsdp: / W
  offload          none, ddp: AdamW's states and its step on the host; fsdp: FSDP2's CPUOffloadPolicy, the sharded
                   weights, EMA, gradients and AdamW states on the host (the gathered blocks still come to the GPU)
  FSDP buffers     fsdp: parameters gathered in the compute dtype: each network's root (what no unit holds) for the
                   phase, plus two units in flight (one prefetched) and one unit's gradients (compute dtype + fp32)
  total = teacher + encoders + weights + EMA + AdamW [+ ddp gradients]
          + max over phases of max(forward, activations + autocast copies + gradients, gradients + step scratch)
          [+ FSDP buffers], the peaks of the forward (generator phase: G's activations + the no-grad passes +
          autocast copies, before the GAN term's pass), the backward and the optimiser step. With accum_steps = 1
          activations + gradients is an upper bound (the backward frees activations as it fills gradients); with
          accumulation both are alive.
A setting fits when its total is at most `USABLE` of the GPU's memory: the rest is left to what is not counted
(CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation, kernels' hidden temporaries, the backward's
gradient buffers of activations).
`bench/plan_check.py` compares these numbers with measured peaks on the CPU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import plan_models as pm
from .plan_trace import ZERO, trace_denoiser, working_set

GIB = 2**30
USABLE = 0.9  # fraction of the GPU's memory the plan may fill (the rest: context, workspaces, fragmentation)
MODES = ("none", "ddp", "fsdp")
SIZES = ("sdxl", "sd3", "flux")  # planner-only names: the sd15 recipe on that published network


@dataclass(frozen=True)
class Counts:
    """Parameter counts (and buffer bytes) of the networks of one configuration."""

    teacher: int  # P_T
    encoders: int  # P_E: VAE and text encoders
    generator: int  # P_G
    fake: int  # P_psi, all of psi's parameters
    fake_trainable: int  # P_psi': what psi trains (LoRA: the factors only)
    head: int  # P_h: the discriminator's linear head
    generator_trainable: int | None = None  # P_G': what G trains (a LoRA student: the factors only); None = P_G
    generator_own_base: int = 0  # a LoRA student that does not share the teacher's weights: its frozen fp32 copy
    buffers: int = 0  # bytes of G's buffers (psi and the EMA have as many)
    units: dict = field(default_factory=dict)  # network -> (largest unit's parameters, the root's own parameters)


@dataclass
class Plan:
    """Everything `dibregman plan` prints: the setting, the counts, and the bytes per rank of every row."""

    name: str
    title: str
    source: str
    note: str
    gpus: int
    gpu_mem_gib: float
    modes: tuple[str, ...]
    batch: int
    accum: int
    bf16: bool
    teacher_bf16: bool
    checkpointing: bool  # the preset's own activation-checkpointing setting
    lora_rank: int
    gan: bool
    counts: Counts
    shape: tuple[int, ...]
    rows: dict = field(default_factory=dict)  # (mode, checkpointing, offload) -> {row: bytes}

    def micro(self, mode: str) -> int:
        """Samples per rank and micro-batch."""
        ranks = 1 if mode == "none" else self.gpus
        return max(1, math.ceil(self.batch / (self.accum * ranks)))

    def total(self, mode: str, checkpointing: bool, offload: bool) -> int:
        return self.rows[(mode, checkpointing, offload)]["total"]

    def fits(self, mode: str, checkpointing: bool, offload: bool) -> bool:
        return self.total(mode, checkpointing, offload) <= USABLE * self.gpu_mem_gib * GIB


def names() -> list[str]:
    """Every name `dibregman plan --preset` takes: the presets, then the planner's sizes."""
    from .presets import PRESETS

    return [*PRESETS, *(s for s in SIZES if s not in PRESETS)]


def _config(name: str, pairs: dict):
    from .config import override
    from .presets import PRESETS

    if name not in names():
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(names())}")
    if name in PRESETS:
        return override(PRESETS[name], pairs)
    return override(PRESETS["sd15"], {"model.teacher_bf16": True, **pairs})  # the sd15 recipe at this size


def _networks(arch: pm.Arch, cfg) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(G's network, psi, the GAN path's backbone), copies of `arch.network` as build.py and t2i.py make them."""
    lora_rank = cfg.model.fake_lora_rank
    net = arch.network.requires_grad_(True)
    fake = copy.deepcopy(net)
    if lora_rank:
        if not arch.text_to_image:
            raise ValueError(f"--lora-rank applies to text-to-image teachers, not {cfg.model.teacher!r}")
        from .networks.lora import PSI_TARGETS, add_lora

        add_lora(fake.net, lora_rank, PSI_TARGETS)
    placement = cfg.model.disc_placement
    if placement not in ("fake_score", "teacher"):
        raise ValueError(f"dibregman plan models disc_placement fake_score or teacher, not {placement!r}")
    return net, fake, (fake if placement == "fake_score" else net)


def _counts(arch: pm.Arch, net: nn.Module, fake: nn.Module) -> Counts:
    units = {}
    for key, module in (("net", net), ("fake", fake)):
        sizes = [pm.count(u) for u in pm.units(module)]
        units[key] = (max(sizes, default=0), pm.count(module) - sum(sizes))
    return Counts(
        teacher=pm.count(net),
        encoders=sum(pm.count(e) for e in arch.encoders.values()),
        generator=pm.count(net),
        fake=pm.count(fake),
        fake_trainable=pm.count(fake, trainable_only=True),
        head=int(getattr(fake, "feature_channels", 0)) + 1,
        buffers=pm.buffer_bytes(net),
        units=units,
    )


def guided(arch: pm.Arch, cfg) -> bool:
    """Whether the teacher runs classifier-free guidance: two passes ([uncond, cond]) per sample."""
    embedded = getattr(getattr(arch.network, "net", None), "config", {}).get("guidance_embeds", False)
    return arch.text_to_image and cfg.model.guidance_scale != 1 and not embedded


def traces(arch: pm.Arch, net: nn.Module, fake: nn.Module, backbone: nn.Module, cfg) -> dict:
    """What the passes keep, per sample: G's pass, psi's pass, psi's features, the GAN term's path (`Trace`s), and
    'nograd', the larger working set of the generator phase's passes without gradients (the teacher at x_t, twice
    under classifier-free guidance; psi at x_t)."""
    shape, bf16, gan = arch.shape, cfg.optim.bf16, cfg.loss.gan_weight > 0
    out = {
        "generator": trace_denoiser(net, shape, 1, bf16=bf16),
        "fake": trace_denoiser(fake, shape, 1, bf16=bf16),
        "features": trace_denoiser(fake, shape, 1, features=True, bf16=bf16),
        "gan": ZERO,
    }
    if gan:
        frozen = backbone is not fake
        if frozen:
            backbone.requires_grad_(False)
        out["gan"] = trace_denoiser(backbone, shape, 1, features=True, input_grad=True, bf16=bf16)
        if frozen:
            backbone.requires_grad_(True)
    teacher_half = bf16 or (cfg.model.teacher_bf16 and arch.text_to_image)
    out["nograd"] = max((2 if guided(arch, cfg) else 1) * working_set(net, shape, 1, bf16=teacher_half),
                        working_set(fake, shape, 1, bf16=bf16))  # fmt: skip
    return out


def phase_bytes(c: Counts, t: dict, *, mode: str, world: int, micro: int, checkpointing: bool, offload: bool,
                bf16: bool, teacher_bytes: int) -> dict:  # fmt: skip
    """The rows of one setting (see the module docstring), bytes per rank; 'total', the peak 'phase', every phase's
    total ('phases') and what offloading puts in host memory ('host')."""
    shard = world if mode == "fsdp" else 1
    pb = 2 if bf16 else 4  # compute dtype of the sharded networks' gathered parameters
    critic = c.fake_trainable + c.head
    nets = {"generator": [("net", pb, True), ("net", teacher_bytes, False), ("fake", pb, False)],
            "critic": [("net", pb, False), ("fake", pb, True)]}  # fmt: skip
    phases = {  # what trains; what the forward keeps before the no-grad passes, and after; the no-grad passes
        "generator": (
            c.generator if c.generator_trainable is None else c.generator_trainable,
            t["generator"],
            t["gan"],
            micro * t.get("nograd", 0),
        ),
        "critic": (critic, ZERO, t["fake"] + t["features"].times(2), 0),
    }
    host_all = offload and mode == "fsdp"  # FSDP2's CPUOffloadPolicy: sharded weights, gradients, optimiser
    g = c.generator if c.generator_trainable is None else c.generator_trainable  # what G trains
    rows = {
        "teacher": (c.teacher * teacher_bytes + c.buffers) / shard,
        "encoders": c.encoders * teacher_bytes,
        "weights": (4 * (g + c.generator_own_base + c.fake + c.head) + 2 * c.buffers) / shard,
        "ema": (4 * (g + c.generator_own_base) + c.buffers) / shard,
        "adamw": 8 * (g + critic) / shard,
    }
    host = rows["adamw"] + (rows["weights"] + rows["ema"] + 4 * (g + critic) / shard if host_all else 0)
    if offload:
        rows.update(adamw=0, **({"weights": 0, "ema": 0} if host_all else {}))
    persistent = sum(rows.values())
    if mode == "ddp":
        rows["gradients"] = 4 * ((c.generator if c.generator_trainable is None else c.generator_trainable) + critic)
        persistent += rows["gradients"]
    best, extras = None, {}
    for phase, (trained, before, after, nograd) in phases.items():
        grads = 0 if mode == "ddp" or host_all else 4 * trained / shard
        act = micro * (before + after).activations(checkpointing)
        copies = 2 * (c.generator + c.fake) if bf16 and mode != "fsdp" else 0
        scratch = 0 if offload else 4 * trained / shard
        buffers = _fsdp_buffers(c, nets[phase]) if mode == "fsdp" else 0
        forward = micro * before.activations(checkpointing, recompute=False) + nograd  # no-grad passes beside G's
        extra = max(forward + copies, act + copies + grads, grads + scratch) + buffers  # forward, backward, step
        extras[phase] = persistent + extra
        if best is None or extra > best[0]:
            best = (extra, phase, dict(gradients=grads, activations=act, nograd=nograd, autocast=copies,
                                       scratch=scratch, fsdp_buffers=buffers))  # fmt: skip
    extra, phase, peak = best
    if mode == "ddp":
        peak.pop("gradients")
    return {**rows, **peak, "total": persistent + extra, "phase": phase, "phases": extras, "host": host}


def _fsdp_buffers(c: Counts, nets: list[tuple[str, int, bool]]) -> float:
    """Gathered parameters of the networks a phase runs: every root's own parameters (gathered from its forward to
    its backward), plus the largest unit in flight twice (prefetch) and, for the trained network, its gradients."""
    roots = sum(c.units[key][1] * nbytes for key, nbytes, _ in nets)
    flight = max(c.units[key][0] * (2 * nbytes + (nbytes + 4 if trained else 0)) for key, nbytes, trained in nets)
    return roots + flight


def _check(gpus: int, gpu_mem_gib: float, parallel: str) -> None:
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not gpu_mem_gib > 0:
        raise ValueError(f"--gpu-mem must be > 0 GiB, got {gpu_mem_gib:g}")
    if parallel not in (*MODES, "all"):
        raise ValueError(f"unknown --parallel {parallel!r}; valid: {', '.join((*MODES, 'all'))}")


def plan(name: str, *, gpus: int, gpu_mem_gib: float, parallel: str = "all", batch: int | None = None,
         lora_rank: int | None = None, pairs: dict | None = None) -> Plan:  # fmt: skip
    """The memory plan of preset (or size) `name` on `gpus` GPUs of `gpu_mem_gib` GiB each; see the module
    docstring. pairs: `--set section.key=value` overrides of the preset."""
    _check(gpus, gpu_mem_gib, parallel)
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if lora_rank is not None and lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {lora_rank}")
    pairs = dict(pairs or {})
    if batch is not None:
        pairs["optim.batch_size"] = batch
    if lora_rank is not None:
        pairs["model.fake_lora_rank"] = lora_rank
    cfg = _config(name, pairs)
    with torch.device("meta"):
        if name in SIZES:
            arch = pm.published(name, cfg.model.feature_depth)
        else:
            arch = pm.arch_for(cfg.model.teacher, cfg, name)
    if cfg.model.resolution and arch.text_to_image:
        side = pm.latent_side(cfg.model.resolution)
        arch.shape = (arch.shape[0], side, side)
    return plan_arch(name, arch, cfg, gpus=gpus, gpu_mem_gib=gpu_mem_gib, parallel=parallel)


def plan_arch(name: str, arch: pm.Arch, cfg, *, gpus: int, gpu_mem_gib: float, parallel: str = "all") -> Plan:
    """The plan of `arch` (built on the meta device; any device works, at the cost of running it) trained with
    `cfg`'s batch, accumulation, precision, LoRA rank, GAN term and checkpointing."""
    _check(gpus, gpu_mem_gib, parallel)
    net, fake, backbone = _networks(arch, cfg)
    bf16, gan = cfg.optim.bf16, cfg.loss.gan_weight > 0
    teacher_bf16 = bool(cfg.model.teacher_bf16 and arch.text_to_image)
    trainable, own_base = pm.student_lora_counts(net, cfg)  # a LoRA student: its adapters, its own base
    counts = replace(_counts(arch, net, fake), generator_trainable=trainable, generator_own_base=own_base)
    p = Plan(name, arch.title, arch.source, arch.note, gpus, gpu_mem_gib, MODES if parallel == "all" else (parallel,),
             cfg.optim.batch_size, cfg.optim.accum_steps, bf16, teacher_bf16, cfg.model.grad_checkpointing,
             cfg.model.fake_lora_rank, gan, counts, tuple(arch.shape))  # fmt: skip
    t = traces(arch, net, fake, backbone, cfg)
    for mode in p.modes:
        for ckpt in (False, True):
            for offload in (False, True):
                p.rows[(mode, ckpt, offload)] = phase_bytes(
                    p.counts, t, mode=mode, world=1 if mode == "none" else gpus, micro=p.micro(mode),
                    checkpointing=ckpt, offload=offload, bf16=bf16, teacher_bytes=2 if teacher_bf16 else 4,
                )  # fmt: skip
    return p


# ---- rendering ------------------------------------------------------------------------------------------------
def fmt_count(x: float) -> str:
    """A parameter count as text: 859.5 M, 2.567 B, 1.281 k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:g}"


def _scale(p: Plan) -> tuple[str, int]:
    """GiB, or MiB for a plan whose largest total is under 1 GiB."""
    return ("GiB", GIB) if max(r["total"] for r in p.rows.values()) >= GIB else ("MiB", 2**20)


ROWS = (
    ("teacher", "teacher network (frozen)"),
    ("encoders", "VAE + text encoders (frozen)"),
    ("weights", "G + psi + head weights (fp32)"),
    ("ema", "EMA of G (fp32)"),
    ("adamw", "AdamW states (2 x fp32)"),
    ("gradients", "gradients (fp32)"),
    ("activations", "activations"),
    ("nograd", "no-grad passes (working set)"),
    ("autocast", "bf16 autocast weight copies"),
    ("scratch", "AdamW step scratch (foreach)"),
    ("fsdp_buffers", "FSDP gathered parameters"),
)


def _header(p: Plan) -> list[str]:
    c = p.counts
    t_dtype = "bf16" if p.teacher_bf16 else "fp32"
    psi = (
        f"{fmt_count(c.fake)} ({fmt_count(c.fake_trainable)} trainable, LoRA rank {p.lora_rank})"
        if p.lora_rank
        else fmt_count(c.fake)
    )
    lines = [
        f"dibregman plan {p.name}: {p.title}",
        f"  config: {p.source}" + (f"; {p.note}" if p.note else ""),
        f"  teacher {fmt_count(c.teacher)} ({t_dtype}, frozen)"
        + (f" + VAE/text encoders {fmt_count(c.encoders)}" if c.encoders else "")
        + f"; G {fmt_count(c.generator)}"
        + (f" ({fmt_count(c.generator_trainable)} LoRA trainable)" if c.generator_trainable is not None else "")
        + f" and psi {psi} (fp32 masters); head {fmt_count(c.head)}",
        f"  sample {'x'.join(map(str, p.shape))}; batch {p.batch} in {p.accum} micro-batch(es): "
        + ", ".join(f"{m} {p.micro(m)}/rank" for m in p.modes)
        + f"; {'bf16 autocast' if p.bf16 else 'fp32'}; GAN term {'on' if p.gan else 'off'}",
        f"  {p.gpus} GPU(s) x {p.gpu_mem_gib:g} GiB; usable {USABLE:.0%} = {USABLE * p.gpu_mem_gib:.1f} GiB",
    ]
    return lines


def render(p: Plan) -> str:
    """The text `dibregman plan` prints: the breakdown at the preset's checkpointing setting, then every setting's
    total and whether it fits."""
    ckpt, (unit, scale) = p.checkpointing, _scale(p)

    def _gib(x: float) -> str:
        return f"{x / scale:.2f}"

    ac = "on" if ckpt else "off"
    lines = [*_header(p), "", f"per rank, {unit}, at each column's peak phase (activation checkpointing (AC) {ac})"]
    width = 34
    lines.append(f"  {'':{width}}" + "".join(f"{m:>12}" for m in p.modes))
    for key, label in ROWS:
        values = [p.rows[(m, ckpt, False)].get(key, 0) for m in p.modes]
        if any(values):
            lines.append(f"  {label:{width}}" + "".join(f"{_gib(v):>12}" for v in values))
    lines.append(f"  {'peak phase':{width}}" + "".join(f"{p.rows[(m, ckpt, False)]['phase']:>12}" for m in p.modes))
    lines += ["", f"total per rank, {unit} (fits: <= {_gib(USABLE * p.gpu_mem_gib * GIB)})"]
    fitting: dict[str, list[str]] = {m: [] for m in p.modes}
    for ac in (False, True):
        for offload in (False, True):
            label = f"AC {'on' if ac else 'off'}, offload {'on' if offload else 'off'}"
            cells = []
            for m in p.modes:
                ok = p.fits(m, ac, offload)
                cells.append(f"{_gib(p.total(m, ac, offload))} {'fits' if ok else 'no'}")
                fitting[m] += [label] if ok else []
            lines.append(f"  {label:{width}}" + "".join(f"{c:>12}" for c in cells))
    host = ", ".join(f"{m} {_gib(p.rows[(m, False, True)]['host'])}" for m in p.modes)
    lines.append(f"  offload: AdamW on the host (none, ddp), FSDP2's CPUOffloadPolicy (fsdp); host memory/rank {host}")
    verdict = {m: "every setting" if len(v) == 4 else "; ".join(v) if v else "nothing" for m, v in fitting.items()}
    for m, v in fitting.items():  # a verdict that needs offloading also needs the host memory
        if v and all("offload on" in s for s in v):
            verdict[m] += f" ({_gib(p.rows[(m, False, True)]['host'])} {unit} host memory per rank)"
    lines += ["", "fits: " + " | ".join(f"{m}: {v}" for m, v in verdict.items())]
    return "\n".join(lines)


__all__ = ["plan", "plan_arch", "render", "fmt_count", "names", "phase_bytes", "traces", "guided", "Plan"]
