"""`dibregman plan` against measured peaks, on the CPU: is the memory plan's arithmetic right for networks small
enough to run here?

    python bench/plan_check.py [--quick] [--threads 1] [--out DIR]

For each configuration (presets gmm, mnist and cifar10 at batch 4; tiny SD-UNet (with and without LoRA), SD3 and
FLUX components), with activation checkpointing off and on, in fp32 (CPU and CUDA autocast cast different ops, so
bf16 is left to the GPU benchmark, bench/speed_parallel.py):
- estimated: `plan.plan_arch` on the meta device, run.parallel=none, every phase's total (module docstring of
  `dibregman.plan`);
- measured: one Algorithm 1 step as `loop.Trainer` runs it (critic round: psi's DSM on G(z) and Eq. 5's BCE through
  the head on psi's features, backward, clip, foreach AdamW; generator round: Eq. 4 on G(z) with the teacher and psi
  at x_t, the GAN term through psi's features, backward, clip, foreach AdamW, EMA), after one warm-up step that
  creates AdamW's states. A phase's peak = the bytes held when it starts, counted tensor by tensor (weights, EMA,
  AdamW states) + the highest running total of the CPU allocator during the phase, read from torch.profiler's
  allocation events (`profile_memory=True` records every allocation with the running total of what was allocated
  since profiling began);
- saved activations: the planner's count on the meta device (fused-attention model) against the same count on the
  real CPU tensors with the CPU's own attention kernel, per pass.
Writes `<out>/plan_check.json` and `plan_check.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from dibregman import distill as losses  # noqa: E402
from dibregman import plan as planner  # noqa: E402
from dibregman import plan_models as pm  # noqa: E402
from dibregman.config import override  # noqa: E402
from dibregman.networks.discriminator import Critic  # noqa: E402
from dibregman.networks.generator import OneStepGenerator  # noqa: E402
from dibregman.plan_trace import trace_denoiser  # noqa: E402
from dibregman.presets import PRESETS  # noqa: E402

NAME = "plan_check"
MIB = 2**20
FP32 = {"optim.bf16": False, "model.teacher_bf16": False, "optim.accum_steps": 1}


def tiny(kind: str) -> pm.Arch:
    """Tiny diffusers networks of the three text-to-image families (random weights, the current device)."""
    import diffusers  # each class imported alone: diffusers.models.transformers imports every transformer at once

    if kind == "unet":
        net = diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8,
        )  # fmt: skip
        return pm.Arch("tiny SD UNet", "bench/plan_check.py", pm.TextNet(net, "unet", (8, 32)), (4, 16, 16), {}, True)
    if kind == "sd3":
        net = diffusers.SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16,
        )  # fmt: skip
        return pm.Arch("tiny SD3", "bench/plan_check.py", pm.TextNet(net, "sd3", (8, 32), 32), (4, 16, 16), {}, True)
    net = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    return pm.Arch("tiny FLUX", "bench/plan_check.py", pm.TextNet(net, "flux", (8, 32), 16), (4, 16, 16), {}, True)


def configs(quick: bool) -> list[tuple[str, callable, object]]:
    """(label, arch builder on the current device, config) of every measured configuration."""
    sd = PRESETS["sd15"]
    out = [
        ("tiny SD UNet", functools.partial(tiny, "unet"), override(sd, {**FP32, "optim.batch_size": 4})),
        ("tiny SD UNet, LoRA 4", functools.partial(tiny, "unet"),
         override(sd, {**FP32, "optim.batch_size": 4, "model.fake_lora_rank": 4})),
        ("tiny SD3", functools.partial(tiny, "sd3"), override(sd, {**FP32, "optim.batch_size": 16})),
        ("tiny FLUX", functools.partial(tiny, "flux"), override(sd, {**FP32, "optim.batch_size": 16})),
    ]  # fmt: skip
    if quick:
        return out[:1]
    presets = []
    for name, batch in (("gmm", 512), ("mnist", 64), ("cifar10", 4)):
        cfg = override(PRESETS[name], {**FP32, "optim.batch_size": batch})
        presets.append((name, functools.partial(pm.arch_for, cfg.model.teacher, cfg, name), cfg))
    return presets + out


# ---- measuring one Algorithm 1 step ------------------------------------------------------------------------
def _checkpoint(net: torch.nn.Module) -> None:
    """Activation checkpointing of every unit (what the planner assumes): diffusers' own, else wrap the units."""
    if hasattr(net, "net") and hasattr(net.net, "enable_gradient_checkpointing"):
        net.net.enable_gradient_checkpointing()
        return
    from torch.utils.checkpoint import checkpoint

    for unit in pm.units(net):
        forward = unit.forward
        unit.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def _tensor_bytes(*objects) -> int:
    """Bytes of every distinct storage among the parameters, buffers and optimiser states of `objects`."""
    seen: dict[int, int] = {}
    for obj in objects:
        if isinstance(obj, torch.optim.Optimizer):
            tensors = [v for s in obj.state.values() for v in s.values() if torch.is_tensor(v)]
        else:
            tensors = [*obj.parameters(), *obj.buffers()]
        for t in tensors:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _peak_allocated(prof) -> int:
    """The highest running total of the CPU allocator during a profiled region (bytes allocated since it began)."""
    from torch._C._profiler import _ExtraFields_Allocation

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    totals = [e.extra_fields.total_allocated for e in walk(prof.profiler.kineto_results.experimental_event_tree())
              if isinstance(e.extra_fields, _ExtraFields_Allocation)]  # fmt: skip
    return max(totals, default=0)


class Step:
    """Teacher, G, psi, head, EMA and both foreach-AdamW optimisers, and the two rounds of `loop.Trainer`.

    prepare(step): called once the networks exist and before the EMA and the optimisers are made (FSDP2 shards
    there); autocast: the context each round runs in (`loop.Trainer._autocast`); device: where the draws and the
    compute are (default: G's parameters'); teacher_dtype: the frozen teacher's weights (model.teacher_bf16);
    foreach: AdamW's and the clip's multi-tensor kernels (CUDA's default; the planner's step scratch assumes them)."""

    def __init__(self, arch: pm.Arch, cfg, checkpointing: bool, *, prepare=None, autocast=contextlib.nullcontext,
                 device: torch.device | None = None, teacher_dtype: torch.dtype = torch.float32,
                 foreach: bool = True):  # fmt: skip
        net = arch.network
        self.shape, self.batch, self.cfg, self.autocast = tuple(arch.shape), cfg.optim.batch_size, cfg, autocast
        self.guided = planner.guided(arch, cfg)  # the teacher's two passes (classifier-free guidance)
        self.gen = OneStepGenerator(copy.deepcopy(net).requires_grad_(True), cfg.model.sigma_init)
        self.fake = copy.deepcopy(net).requires_grad_(True)
        self.teacher = net.eval().requires_grad_(False).to(teacher_dtype)
        if cfg.model.fake_lora_rank:
            from dibregman.networks.lora import PSI_TARGETS, add_lora

            add_lora(self.fake.net, cfg.model.fake_lora_rank, PSI_TARGETS)
        self.device = device or next(net.parameters()).device  # where the draws and the compute are
        self.psi_eta = Critic(self.fake, "linear").to(self.device)  # psi + eta as the engine holds them
        self.disc = functools.partial(self.psi_eta, logit=True)
        if checkpointing:
            _checkpoint(self.gen.denoiser)
            _checkpoint(self.fake)
        if prepare is not None:
            prepare(self)
        self.ema = [p.detach().clone() for p in self.gen.parameters()]  # sharded like G's parameters
        critic = [p for p in [*self.fake.parameters(), *self.psi_eta.head_parameters()] if p.requires_grad]
        self.critic_params, self.gen_params = critic, list(self.gen.parameters())
        self.foreach = foreach
        adam = dict(lr=1e-6, betas=(0.0, 0.999), foreach=foreach)
        self.opt_c, self.opt_g = torch.optim.AdamW(critic, **adam), torch.optim.AdamW(self.gen_params, **adam)
        self.g = torch.Generator(self.device).manual_seed(0)

    def held(self) -> int:
        ema = torch.nn.ParameterList([torch.nn.Parameter(t, requires_grad=False) for t in self.ema])
        return _tensor_bytes(self.teacher, self.gen, self.fake, self.psi_eta.disc, ema, self.opt_c, self.opt_g)

    def _draw(self, *shape):
        return torch.randn(*shape, generator=self.g, device=self.device)

    def critic(self) -> None:
        b, shape = self.batch, self.shape
        sigma = torch.rand(b, generator=self.g, device=self.device) + 0.1
        with self.autocast():
            with torch.no_grad():
                x_fake = self.gen(self._draw(b, *shape)).float()
            s = losses.bcast(sigma, x_fake)
            d_psi = self.fake(x_fake + s * self._draw(b, *shape), sigma).float()
            dsm = losses.fake_score_loss(d_psi, x_fake, torch.ones(b, device=self.device), b)
            real = self._draw(b, *shape)
            l_real = self.disc(real + s * self._draw(b, *shape), sigma)
            l_fake = self.disc(x_fake + s * self._draw(b, *shape), sigma)
            loss = dsm + losses.discriminator_loss(l_real, l_fake, b)[0]
        loss.backward()
        self._apply(self.opt_c, self.critic_params, self.foreach)

    def generator(self) -> None:
        b, shape, gan = self.batch, self.shape, self.cfg.loss.gan_weight
        sigma = torch.rand(b, generator=self.g, device=self.device) + 0.1
        with self.autocast():
            x = self.gen(self._draw(b, *shape)).float()
            s = losses.bcast(sigma, x)
            x_t = x.detach() + s * self._draw(b, *shape)
            with torch.no_grad():
                d_phi = self._teacher(x_t, sigma)
                d_psi = self.fake(x_t, sigma).float()
                divisor = losses.time_weight_divisor("dmd", sigma, x.detach(), d_phi)
                weight = torch.sigmoid(self.disc(x_t, sigma))  # of the logits' shape (its values do not matter)
            loss = losses.dibregman_loss(x, d_phi, d_psi, weight, divisor, b)
            if gan > 0:
                logits = self.disc(x + s * self._draw(b, *shape), sigma)
                loss = loss + gan * losses.gan_generator_loss(logits).sum() / b
        loss.backward()
        for p in self.critic_params:
            p.grad = None
        self._apply(self.opt_g, self.gen_params, self.foreach)
        with torch.no_grad():
            if self.foreach:
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.gen_params], 0.01)
            else:
                for pe, pn in zip(self.ema, self.gen_params, strict=True):
                    pe.lerp_(pn.detach(), 0.01)

    def _teacher(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D_phi at x_t, guided like `teachers/sd.py`: one batched pass over [uncond, cond]."""
        x = x_t.to(next(self.teacher.parameters()).dtype)
        if not self.guided:
            return self.teacher(x, sigma).float()
        out_u, out_c = self.teacher(torch.cat([x, x]), torch.cat([sigma, sigma])).float().chunk(2)
        return out_u + self.cfg.model.guidance_scale * (out_c - out_u)

    @staticmethod
    def _apply(opt, params, foreach: bool) -> None:
        torch.nn.utils.clip_grad_norm_(params, 10.0, foreach=foreach)
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(step: Step) -> dict:
    """Peak bytes of each phase of the second step (the first creates AdamW's states), as the module docstring says."""
    from torch.profiler import ProfilerActivity, profile

    step.critic()
    step.generator()
    out = {}
    for phase in ("critic", "generator"):
        held = step.held()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            getattr(step, phase)()
        out[phase] = {"held_at_start": held, "peak": held + _peak_allocated(prof)}
    return out


def saved_activations(arch: pm.Arch, meta: pm.Arch, batch: int) -> dict:
    """Saved bytes of G's pass, psi's pass and psi's features: the planner's meta count x batch, and measured."""
    out = {}
    for key, kw in (("pass", {}), ("features", {"features": True})):
        est = trace_denoiser(meta.network.requires_grad_(True), meta.shape, 1, **kw).activations(False) * batch
        real = trace_denoiser(arch.network.requires_grad_(True), arch.shape, batch, fused_attention=False, **kw)
        out[key] = {"estimated": est, "measured": real.activations(False)}
    return out


def check(label: str, build, cfg) -> list[dict]:
    rows = []
    with torch.device("meta"):
        meta = build()
    p = planner.plan_arch(label, meta, cfg, gpus=1, gpu_mem_gib=80, parallel="none")
    torch.manual_seed(0)
    acts = saved_activations(build(), meta, cfg.optim.batch_size)
    has_units = bool(pm.units(meta.network))
    for ckpt in (False, True) if has_units else (False,):
        torch.manual_seed(0)
        measured = measure(Step(build(), cfg, ckpt))
        est = p.rows[("none", ckpt, False)]
        for phase, m in measured.items():
            rows.append({"config": label, "checkpointing": ckpt, "phase": phase, "batch": cfg.optim.batch_size,
                         "params": p.counts.generator, "estimated": est["phases"][phase], "measured": m["peak"],
                         "held_measured": m["held_at_start"], "ratio": m["peak"] / est["phases"][phase],
                         "activations": acts if not ckpt and phase == "critic" else None})  # fmt: skip
        print(f"[{NAME}] {label} AC {'on' if ckpt else 'off'}: " + ", ".join(
            f"{r['phase']} est {r['estimated'] / MIB:.1f} MiB / meas {r['measured'] / MIB:.1f} MiB" for r in rows[-2:]),
            flush=True)  # fmt: skip
    return rows


def markdown(data: dict) -> str:
    f = common.fmt
    head = ["configuration", "params", "batch", "AC", "phase", "estimated MiB", "measured MiB", "measured / estimated"]
    rows = [[r["config"], planner.fmt_count(r["params"]), r["batch"], "on" if r["checkpointing"] else "off", r["phase"],
             f(r["estimated"] / MIB, 4), f(r["measured"] / MIB, 4), f(r["ratio"], 3)]
            for r in data["rows"]]  # fmt: skip
    acts = [[r["config"], k, f(v["estimated"] / MIB, 4), f(v["measured"] / MIB, 4),
             f(v["measured"] / v["estimated"], 4)]
            for r in data["rows"] if r["activations"] for k, v in r["activations"].items()]  # fmt: skip
    ratios = [r["ratio"] for r in data["rows"]]
    return "\n".join([
        "## `dibregman plan` against measured peaks (CPU, fp32)", "", common.header_line(data), "",
        "Peak bytes of each phase of one Algorithm 1 step (run.parallel=none): the planner's estimate (meta device) "
        "and the measured peak (bytes held at the phase's start, counted tensor by tensor, + the CPU allocator's "
        "highest running total during the phase, from torch.profiler's allocation events).", "",
        *common.table(head, rows), "",
        f"measured / estimated: {f(min(ratios), 3)} to {f(max(ratios), 3)} over {len(ratios)} phases.", "",
        "Saved activations of one pass at the batch above (AC off): the planner's count on the meta device (fused "
        "attention model, one sample x batch) and the same count on the real CPU tensors (the CPU's own kernels); "
        "`pass` = D(x, sigma) of the teacher's network with trainable weights (G's pass), `features` = the pass up "
        "to the discriminator's tap.", "",
        *common.table(["configuration", "pass", "estimated MiB", "measured MiB", "measured / estimated"], acts), "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = common.add_common_args(p)
    args = common.parse(p, argv, NAME)
    common.setup(args)
    torch.set_num_threads(args.threads or 1)
    data = common.record(NAME, args, torch.device("cpu"), {})
    t0 = time.time()
    data["rows"] = [row for label, build, cfg in configs(args.quick) for row in check(label, build, cfg)]
    data["measure_sec"] = round(time.time() - t0, 1)
    common.finish(data, args.out, markdown)
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
