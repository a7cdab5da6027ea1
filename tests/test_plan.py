"""`dibregman plan`: the published networks' sizes, the per-rank memory arithmetic of none/ddp/fsdp, the activation
count on the meta device against the same count on real CPU tensors, the fit verdict and the CLI."""

import pytest
import torch

from dibregman import plan as planner
from dibregman import plan_models as pm
from dibregman.cli import main
from dibregman.plan_trace import Trace, trace_denoiser

GIB = 2**30


@pytest.fixture(scope="module")
def published():
    with torch.device("meta"):
        return {name: pm.published(name) for name in pm.PUBLISHED}


def test_published_networks_have_their_published_sizes(published):
    sizes = {name: pm.count(a.network) for name, a in published.items()}
    assert sizes == {"sd15": 859_520_964, "sdxl": 2_567_463_684, "sd3": 2_028_328_000, "flux": 11_901_408_320}
    encoders = {name: {k: pm.count(v) for k, v in a.encoders.items()} for name, a in published.items()}
    assert encoders["sd15"] == {"vae": 83_653_863, "text_encoder": 123_060_480}  # SD VAE, CLIP ViT-L/14
    assert encoders["sdxl"]["text_encoder_2"] == 694_659_840  # OpenCLIP ViT-bigG/14 with projection
    assert encoders["flux"]["text_encoder_t5"] == encoders["sd3"]["text_encoder_t5"] == 4_762_310_656  # T5-XXL
    assert all(p.device.type == "meta" for a in published.values() for p in a.network.parameters())


def test_units_cover_the_blocks_diffusers_checkpoints(published):
    unet = pm.units(published["sd15"].network)
    names = {type(u).__name__ for u in unet}
    assert names == {"ResnetBlock2D", "BasicTransformerBlock"} and len(unet) == 22 + 16
    flux = pm.units(published["flux"].network)
    assert len(flux) == 19 + 38 and sum(map(pm.count, flux)) < pm.count(published["flux"].network)


def _counts(**kw) -> planner.Counts:
    c = dict(teacher=100, encoders=10, generator=100, fake=100, fake_trainable=100, head=1, buffers=0,
             units={"net": (20, 10), "fake": (20, 10)})  # fmt: skip
    return planner.Counts(**{**c, **kw})


TRACES = {
    "generator": Trace(outside=1000, inside=3000, unit_inputs=100, unit_max=500, weights=0),
    "fake": Trace(outside=1000, inside=3000, unit_inputs=100, unit_max=500, weights=0),
    "features": Trace(outside=400, inside=1000, unit_inputs=50, unit_max=500, weights=0),
    "gan": Trace(0, 0, 0, 0, 0),
    "nograd": 300,
}


def _rows(mode, world=4, ac=False, offload=False, bf16=False, traces=TRACES, **counts):
    return planner.phase_bytes(_counts(**counts), traces, mode=mode, world=world, micro=2, checkpointing=ac,
                               offload=offload, bf16=bf16, teacher_bytes=4)  # fmt: skip


def test_fsdp_shards_every_state_by_the_world_size_and_ddp_replicates():
    none, ddp, fsdp = _rows("none", world=1), _rows("ddp"), _rows("fsdp")
    for key in ("teacher", "weights", "ema", "adamw"):
        assert none[key] == ddp[key] == pytest.approx(4 * fsdp[key]), key
    assert none["teacher"] == 400 and none["weights"] == 4 * 201 and none["ema"] == 400 and none["adamw"] == 8 * 201
    assert none["encoders"] == ddp["encoders"] == fsdp["encoders"] == 40  # replicated
    # critic phase: psi + head train; activations psi's pass + 2 feature passes, x micro-batch 2
    assert none["phase"] == "critic" and none["activations"] == 2 * (4000 + 2 * 1400)
    assert none["gradients"] == 4 * 101 and fsdp["gradients"] == pytest.approx(4 * 101 / 4)
    assert ddp["gradients"] == 4 * 201  # both networks' buckets persist
    assert fsdp["fsdp_buffers"] > 0 and none["fsdp_buffers"] == ddp["fsdp_buffers"] == 0
    held = sum(none[k] for k in ("teacher", "encoders", "weights", "ema", "adamw"))
    assert none["total"] == held + none["activations"] + none["gradients"]  # the critic's backward
    assert ddp["total"] == held + ddp["gradients"] + ddp["activations"]
    gen = _rows("none", world=1, traces={**TRACES, "nograd": 9000})  # the generator phase peaks in its forward
    assert gen["phase"] == "generator" and gen["nograd"] == 2 * 9000 and gen["gradients"] == 400
    assert gen["activations"] == 2 * 4000  # G's pass (the GAN term's trace is empty here)
    held = sum(gen[k] for k in ("teacher", "encoders", "weights", "ema", "adamw"))
    assert gen["total"] == held + gen["activations"] + gen["nograd"]


def test_checkpointing_offload_and_autocast_move_the_right_rows():
    off, on = _rows("none", world=1), _rows("none", world=1, ac=True)
    # outside + the units' inputs of psi's pass and both feature passes, + one unit recomputed at a time
    assert on["activations"] == 2 * ((1000 + 2 * 400) + (100 + 2 * 50) + 500) < off["activations"]
    offload = _rows("fsdp", offload=True)
    assert offload["adamw"] == offload["scratch"] == 0 and offload["total"] < _rows("fsdp")["total"]
    bf16 = _rows("none", world=1, bf16=True)
    assert bf16["autocast"] == 2 * (100 + 100) and _rows("fsdp", bf16=True)["autocast"] == 0


@pytest.fixture(scope="module")
def mnist_plan():
    return planner.plan("mnist", gpus=4, gpu_mem_gib=80)


def test_plan_of_a_preset_counts_its_networks_and_fits_by_the_usable_fraction(mnist_plan):
    from dibregman.teachers import load_teacher

    p, teacher = mnist_plan, load_teacher("edm:assets/mnist_teacher.safetensors")  # the shipped weights
    size = sum(t.numel() for t in teacher.parameters())
    assert p.counts.teacher == p.counts.generator == p.counts.fake == size and p.counts.head == 48 + 1
    assert p.micro("none") == 64 and p.micro("ddp") == p.micro("fsdp") == 16
    total = p.total("ddp", False, False)
    assert p.fits("ddp", False, False)
    small = planner.Plan(**{**vars(p), "gpu_mem_gib": total / GIB / planner.USABLE * 0.999})
    assert not small.fits("ddp", False, False)
    exact = planner.Plan(**{**vars(p), "gpu_mem_gib": total / GIB / planner.USABLE * 1.001})
    assert exact.fits("ddp", False, False)


def test_meta_count_equals_the_count_on_real_cpu_tensors():
    """The fused-attention model keeps what the CPU's own attention kernel keeps; one sample x batch is exact."""
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4, norm_num_groups=8,
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
    with torch.device("meta"):
        meta = pm.TextNet(UNet2DConditionModel(**cfg), "unet", (4, 16))
    real = pm.TextNet(UNet2DConditionModel(**cfg), "unet", (4, 16))
    for kw in ({}, {"features": True}):
        est = trace_denoiser(meta, (4, 8, 8), 1, **kw)
        got = trace_denoiser(real, (4, 8, 8), 3, fused_attention=False, **kw)
        assert 3 * est.activations(False) == got.activations(False) > 0
    assert 0 < est.activations(True) < est.activations(False)  # features pass, checkpointed
    half, full = trace_denoiser(meta, (4, 8, 8), 1, bf16=True), trace_denoiser(meta, (4, 8, 8), 1)
    assert half.weights > 0 and 0.4 < half.activations(False) / full.activations(False) < 0.9


def test_sd15_plan_lora_and_what_does_not_fit():
    p = planner.plan("sd15", gpus=8, gpu_mem_gib=80, lora_rank=8)
    assert p.counts.teacher == 859_520_964 and p.counts.encoders == 83_653_863 + 123_060_480
    assert 0 < p.counts.fake_trainable < 0.01 * p.counts.fake
    assert p.fits("fsdp", True, False) and p.fits("none", True, True)
    assert not planner.Plan(**{**vars(p), "gpu_mem_gib": 8}).fits("none", True, True)
    with pytest.raises(ValueError, match="--lora-rank applies to text-to-image"):
        planner.plan("mnist", gpus=1, gpu_mem_gib=80, lora_rank=4)


def test_cli_prints_every_mode_and_the_verdict(capsys, mnist_plan):
    assert main(["plan", "--preset", "mnist", "--gpus", "4", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "dibregman plan mnist" in out and "none" in out and "ddp" in out and "fsdp" in out
    assert out.strip().splitlines()[-1] == "fits: none: every setting | ddp: every setting | fsdp: every setting"
    unit = "GiB" if max(r["total"] for r in mnist_plan.rows.values()) >= GIB else "MiB"
    total = mnist_plan.total("fsdp", False, False) / (GIB if unit == "GiB" else 2**20)
    assert f"{total:.2f} fits" in out
    assert main(["plan", "--preset", "mnist", "--gpus", "2", "--gpu-mem", "0.01", "--parallel", "ddp"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "fits: ddp: nothing" and " none " not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'; valid: gmm, mnist, cifar10, sd15, mnist-paper, sdxl, sd3, flux"),
        (["--preset", "mnist", "--gpus", "0"], "--gpus must be >= 1"),
        (["--preset", "mnist", "--parallel", "zero"], "unknown --parallel 'zero'; valid: none, ddp, fsdp, all"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_a_lora_student_on_the_shared_base_holds_only_its_adapters():
    """model.student_lora_rank: G trains (and keeps fp32 masters, EMA, AdamW states of) its adapters only; with
    model.share_lora_base off it also holds a frozen copy of the teacher's weights."""
    from dibregman.plan import plan

    full = plan("sd15", gpus=1, gpu_mem_gib=80, parallel="none")
    lora = plan("sd15", gpus=1, gpu_mem_gib=80, parallel="none", pairs={"model.student_lora_rank": 64})
    own = plan("sd15", gpus=1, gpu_mem_gib=80, parallel="none",
               pairs={"model.student_lora_rank": 64, "model.share_lora_base": False})  # fmt: skip
    c = lora.counts
    assert 0 < c.generator_trainable < 0.2 * c.generator and own.counts.generator_own_base == c.generator
    for key in ((False, False), (True, False)):
        f, lo, ow = (x.rows[("none", *key)] for x in (full, lora, own))
        assert lo["adamw"] == 8 * (c.generator_trainable + c.fake_trainable + c.head)
        assert lo["total"] < ow["total"] < f["total"] + 4 * c.generator
        assert lo["weights"] + 4 * c.generator == ow["weights"]
