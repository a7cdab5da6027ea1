"""The .md and .png of `critic_retest.py`: every number read from its JSON (`render`, `plot`)."""

from __future__ import annotations

import math

import common

NAME = "critic_retest"
TITLE = "Critic test-retest on MNIST: does the discriminator's logit carry signal or noise?"
LABELS = {"linear_x10": "linear ×10", "linear_x50": "linear ×50", "mean": "mean"}
NOISE_CORR = 0.5  # retest correlation below which a quantity's noise variance exceeds its reproducible variance
FLAT = 1.1  # a weight factor below this: the weights are within 10 % of uniform
NO_DROP = 0.01  # training BCE within this of 2 ln 2 (0.7 %) and ...
CHANCE_ACC = 0.53  # ... held-out accuracy below this (5 standard errors at 8 bins x 2 x 256): no separation


def _f(x, d: int = 2) -> str:
    return common.fmt(x, d)


def _sig(b: dict) -> str:
    return f"σ {_f(b['sigma'][0])}–{_f(b['sigma'][1])}"


def _generator(s: dict) -> str:
    g = s.get("generator", s.get("student"))  # "student": the key of the first JSON
    if g == "init":
        return (
            "the untrained teacher copy G(z) = D(σ_init z, σ_init) that every run starts from (in-loop FID 314 at "
            "n = 500 in the sweep's logs)"
        )
    return f"the shipped one-step student (`{g}`)"


def _lr(res: dict) -> str:
    if res["head"] == "mean":
        return "no parameters of its own: only ψ's encoder moves its logit"
    return f"zero-initialised, lr ×{_f(res['head_lr_mult'], 3)} the fake score's"


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def bce_summary(curve: list[dict], kimg: float) -> dict:
    """Training BCE (real + fake terms) averaged over the window ending at half the run and over the last eighth."""
    half = [c["bce"] for c in curve if 0.375 * kimg < c["kimg"] <= 0.5 * kimg + 1e-9]
    end = [c["bce"] for c in curve if c["kimg"] > 0.875 * kimg - 1e-9]
    h, e = (_mean(half) if half else None), (_mean(end) if end else None)
    return {
        "half": h,
        "end": e,
        "total_drop": None if e is None else 2 * math.log(2) - e,
        "last_half_drop": None if h is None or e is None else h - e,
    }


def classify(bins: list[dict], lam: str) -> tuple[str, list[int]]:
    """("uniform" | "signal" | "noise" | "mixed", the 1-based bins whose weights' retest r < NOISE_CORR)."""
    fac = [b["factor"][lam] for b in bins]
    sig = [b["signal_factor"][lam] for b in bins]
    noisy = [i + 1 for i, b in enumerate(bins) if not b["weight_corr"][lam] >= NOISE_CORR]
    if max(max(fac), max(sig)) < FLAT:
        return "uniform", noisy
    return ("signal" if not noisy else "noise" if len(noisy) == len(bins) else "mixed"), noisy


def verdict(bins: list[dict], lam: str, sigma_bins: list[dict]) -> str:
    """One line per head and lambda: the weight error factor's range over bins and the retest correlation of the
    weights, classified by NOISE_CORR."""
    fac = [b["factor"][lam] for b in bins]
    sig = [b["signal_factor"][lam] for b in bins]
    wc = [b["weight_corr"][lam] for b in bins]
    hi, lo = max(range(len(fac)), key=fac.__getitem__), min(range(len(fac)), key=fac.__getitem__)
    kind, noisy = classify(bins, lam)
    tail = {
        "uniform": "the weights stay within 10 % of uniform: SBA(λ) acts as reverse KL",
        "signal": "the weights **carry signal** in every bin (reproducible; not necessarily correct)",
        "noise": "the weights are **dominated by noise** in every bin",
        "mixed": f"the weights are **dominated by noise** in bins {noisy} of {len(bins)}, reproducible in the others",
    }[kind]
    return (
        f"λ = {lam}: weight error factor e^{{{lam}δ}} ×{_f(fac[hi])} in bin {hi + 1} ({_sig(sigma_bins[hi])}), "
        f"×{_f(fac[lo])} at best (bin {lo + 1}); reproducible spread e^{{{lam}·sd}} ×{_f(min(sig))}–×{_f(max(sig))}; "
        f"retest r of the weights {_f(min(wc))}–{_f(max(wc))}: {tail}."
    )


def training_note(res: dict) -> str:
    """Whether the critics learnt to tell the two sides apart: the training BCE's drop from 2 ln 2 and its last
    half, and the held-out accuracy and BCE gain."""
    bce = [bce_summary(r["curve"], res["points"][-1]["kimg"]) for r in res["runs"]]
    if any(b["total_drop"] is None or b["last_half_drop"] is None for b in bce):
        return "Training BCE: too few log points to tell."
    acc = [h["acc"] for seed in res["heldout"] for h in seed]  # per seed and bin
    gain = [h["gain"] for seed in res["heldout"] for h in seed]
    drops = ", ".join(f"{_f(b['total_drop'])} ({_f(b['last_half_drop'])} of it in the second half)" for b in bce)
    held = (
        f"held-out accuracy {_f(_mean(acc), 3)} (per bin and seed {_f(min(acc), 3)}–{_f(max(acc), 3)}), BCE gain "
        f"{_f(min(gain))}–{_f(max(gain))} per bin"
    )
    if max(b["total_drop"] for b in bce) < NO_DROP and _mean(acc) < CHANCE_ACC:
        return (
            f"Training BCE fell by {drops} from 2 ln 2; {held}: the critics **did not learn to tell the two sides "
            "apart**, so whatever their logits reproduce is not a learnt p/q."
        )
    flat = all(b["last_half_drop"] <= 0.25 * b["total_drop"] for b in bce)
    return (
        f"Training BCE fell by {drops}: "
        + ("flat by the end" if flat else "**still falling** at the end")
        + (f"; {held}.")
    )


def summary(d: dict) -> list[str]:
    """The verdict per head and lambda in one line each, then the training length and the analytic check."""
    lams, out = [f"{x:g}" for x in d["lambdas"]], ["**Verdict** (details and every number below):", ""]
    word = {"uniform": "near-uniform", "signal": "reproducible", "noise": "noise", "mixed": "noise in bins {}"}
    for label, res in d["mnist"].items():
        bins = res["points"][-1]["bins"]
        parts = []
        for lam in lams:
            kind, noisy = classify(bins, lam)
            worst = max(b["factor"][lam] for b in bins)
            parts.append(f"λ = {lam}: {word[kind].format(noisy)} (weight error up to ×{_f(worst)})")
        out.append(f"- MNIST, `{LABELS.get(label, label)}`: " + "; ".join(parts) + ". " + training_note(res))
    for label, res in gmm_heads(d):
        bins = at_kimg(res, d["sizes"]["kimg"])["bins"]
        err, dc = _mean([_mean(b["rmse_centred"]) for b in bins]), _mean([b["delta_centred"] for b in bins])
        worst = max(_mean(b["rmse_centred"]) for b in bins)
        out.append(
            f"- d = 784 pair, `{LABELS.get(label, label)}`: true centred error {_f(err)} vs test-retest δ {_f(dc)} "
            f"(mean over bins): the true error is ×{_f(err / dc)} the test-retest δ; at λ = 5 the true error "
            f"multiplies a weight by up to ×{_f(math.exp(5 * worst))} (one std, worst bin)."
        )
    return out + [""]


def mnist_section(d: dict) -> list[str]:
    lines, lams, sb = (
        ["## MNIST: two critics per head on the frozen generator", ""],
        [f"{x:g}" for x in d["lambdas"]],
        d["bins"],
    )
    for label, res in d["mnist"].items():
        final = res["points"][-1]
        bins = final["bins"]
        runs = res["runs"]
        bce = [bce_summary(r["curve"], final["kimg"]) for r in runs]
        lines += [
            f"### Head `{LABELS.get(label, label)}` ({_lr(res)}), after {_f(final['kimg'], 3)} kimg",
            "",
        ]
        lines += [
            "Training BCE (real + fake terms, 2 ln 2 = 1.386 at l = 0), seeds "
            + ", ".join(
                f"{r['seed']}: {_f(b['half'], 4)} at half → {_f(b['end'], 4)} at the end (total drop "
                f"{_f(b['total_drop'], 2)}, last half {_f(b['last_half_drop'], 2)})"
                for r, b in zip(runs, bce, strict=True)
            )
            + f"; generator frozen: {all(r['generator_frozen'] for r in runs)}; CPU "
            + " + ".join(f"{r['cpu_sec']:g}" for r in runs)
            + " s.",
            "",
        ]
        lines += [verdict(bins, lam, sb) for lam in lams] + [""]
        head = [
            "bin",
            "sd(l)",
            "δ",
            "δ centred",
            "retest r",
            "SNR",
            *[f"e^{{{x}δ}}" for x in lams],
            "r_w λ=5",
            "r_w λ=10",
            "ESS λ=5",
            "held-out acc",
            "BCE gain",
        ]
        rows = []
        for i, b in enumerate(bins):
            ho = [h[i] for h in res["heldout"]]
            rows.append(
                [
                    f"{i + 1}: {_sig(sb[i])}",
                    _f(_mean(b["std"])),
                    _f(b["delta"]),
                    _f(b["delta_centred"]),
                    _f(b["corr"]),
                    _f(b["snr"]),
                    *[_f(b["factor"][x], 3) for x in lams],
                    _f(b["weight_corr"]["5"]),
                    _f(b["weight_corr"]["10"]),
                    _f(b["ess"]["5"]),
                    _f(_mean([h["acc"] for h in ho]), 3),
                    _f(_mean([h["gain"] for h in ho]), 2),
                ]
            )
        lines += common.table(head, rows) + [""]
        if len(res["points"]) > 1:
            head = ["kimg", *[f"bin {i + 1}" for i in range(len(bins))]]
            rows = [
                [_f(p["kimg"], 3), *[f"{_f(b['delta_centred'])} / {_f(b['corr'])}" for b in p["bins"]]]
                for p in res["points"]
            ]
            lines += ["δ centred / retest r as the critics train:", ""] + common.table(head, rows) + [""]
        if "init" in res:
            rows = [
                [f"{i + 1}", _f(b["std"]), *[_f(c) for c in b["corr_final"]], _f(b["acc"], 3), _f(b["gain"], 2)]
                for i, b in enumerate(res["init"])
            ]
            head = [
                "bin",
                "sd(l) untrained",
                "r(untrained, seed a)",
                "r(untrained, seed b)",
                "held-out acc",
                "BCE gain",
            ]
            lines += (
                [
                    "The `mean` head before training (psi = the teacher copy): its logit's spread and its correlation "
                    "with each trained critic's logit (a shared starting function both critics keep reproduces "
                    "whatever it measures):",
                    "",
                ]
                + common.table(head, rows)
                + [""]
            )
    return lines


def gmm_section(d: dict) -> list[str]:
    g, sb = d["gmm"], d["bins"]
    if not gmm_heads(d):
        return []
    lines = [
        "## Where the answer is known: an analytic pair at d = 784",
        "",
        f"p, q: {g['pair']}. The critic is `calibration.Critic` (the engine's losses, draws and optimiser) with the "
        f"MNIST critics' config; its network is an MLP {g['mlp']} fitted to p for {g['init_steps']} steps (an analytic "
        "teacher has no network to copy), shared by both seeds as the teacher copy is on MNIST. Per bin, on fresh q "
        f"samples (the generator side): the exact logit's spread, each critic's error against it (centred: after the "
        "bin mean, which `sigma_bins` cancels), the test-retest δ centred and the part of the error the two critics "
        "share (invisible to a test-retest): shared² = var((e1 + e2)/2) − δ²/2.",
        "",
    ]
    for label, res in gmm_heads(d):
        final = at_kimg(res, d["sizes"]["kimg"])
        bins = final["bins"]
        err = [_mean(b["rmse_centred"]) for b in bins]
        dc = [b["delta_centred"] for b in bins]
        ratio = _mean(err) / _mean(dc) if _mean(dc) > 0 else float("inf")
        lines += [
            f"### Head `{LABELS.get(label, label)}`, after {_f(final['kimg'], 3)} kimg",
            "",
            f"True centred error {_f(min(err))}–{_f(max(err))} over the bins, test-retest δ centred "
            f"{_f(min(dc))}–{_f(max(dc))}: the true error is ×{_f(ratio)} the test-retest δ on average "
            f"(λ = 5: true factor e^{{5·err}} up to ×{_f(math.exp(5 * max(err)))}, test-retest e^{{5δ}} up to "
            f"×{_f(math.exp(5 * max(dc)))}).",
            "",
        ]
        head = [
            "bin",
            "sd(l*) exact",
            "sd(l)",
            "err centred",
            "err",
            "r(l, l*)",
            "δ centred",
            "retest r",
            "shared",
            "e^{5·err}",
            "e^{5δ}",
        ]
        rows = [
            [
                f"{i + 1}: {_sig(sb[i])}",
                _f(b["exact_std"]),
                _f(_mean(b["std"])),
                _f(_mean(b["rmse_centred"])),
                _f(_mean(b["rmse"])),
                _f(_mean(b["corr_exact"])),
                _f(b["delta_centred"]),
                _f(b["corr"]),
                _f(b["shared_centred"]),
                _f(math.exp(5 * _mean(b["rmse_centred"])), 3),
                _f(b["factor"]["5"], 3),
            ]
            for i, b in enumerate(bins)
        ]
        lines += common.table(head, rows) + [""]
        head = ["kimg", "err centred", "δ centred", "shared", "r(l, l*)", "retest r"]
        rows = [[_f(p["kimg"], 3), *[_f(_mean([fn(b) for b in p["bins"]])) for fn in GMM_TREND]] for p in res["points"]]
        lines += ["Mean over the bins as the critics train (the same critics, longer):", ""]
        lines += common.table(head, rows) + [""]
    return lines


GMM_TREND = (
    lambda b: _mean(b["rmse_centred"]),
    lambda b: b["delta_centred"],
    lambda b: b["shared_centred"],
    lambda b: _mean(b["corr_exact"]),
    lambda b: b["corr"],
)


def gmm_heads(d: dict) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in d["gmm"].items() if isinstance(v, dict) and "points" in v]


def at_kimg(res: dict, kimg: float) -> dict:
    """The evaluation point nearest `kimg` (the analytic pair's critics also run longer than the MNIST ones)."""
    return min(res["points"], key=lambda p: abs(p["kimg"] - kimg))


def _first(d: dict) -> dict:
    return next(iter(d["mnist"].values()))


def render(d: dict, all_data: dict | None = None) -> str:
    s, z = d["setup"], d["sizes"]
    n_bins = len(d["bins"])
    lines = [
        f"# {TITLE}",
        "",
        common.header_line(d) + f" CPU time {_f(d.get('cpu_sec'), 4)} s (2-core machine shared with other jobs).",
        "",
        f"**What was measured.** The generator is frozen at {_generator(s)}, the teacher is "
        f"`{s['teacher']['spec']}`. For each head, two critics (fake score ψ + "
        "discriminator head) with different seeds are trained the way the engine trains them: `loop.Trainer` with "
        f"the `mnist` preset + the MNIST sweep's RECIPE, batch {s['batch']}, fake lr {s['fake_lr']:g}, betas "
        f"{s['betas']}, {s['lr_schedule']} (the critics stop after {_f(z['kimg'], 3)} kimg of it), grad clip "
        f"{s['grad_clip']:g}, fake-score σ at the `{s['fake_sigma']}` draws, discriminator t ~ U[0, "
        f"{s['disc_t_max']:g}], real side `{s['real']}`; the generator's weights in `trainer.m.generator` and the EMA, "
        "`loss.gen_warmup_kimg` beyond the run so the generator never steps (checked bit for bit). Then both "
        f"critics score the same {z['n_eval']} fresh noisy generator samples in each of {n_bins} σ bins (equal widths "
        f"in Karras t over the generator step's [0, {s['gen_t_max']:g}], highest σ first), and {z['n_eval']} noised "
        "MNIST test images per bin for the held-out accuracy and BCE gain (log 2 − BCE per side; > 0: better than "
        f"l = 0). Logits clamped to ±{s['logit_clamp']:g} as the weights see them. Sizes: {len(d['mnist'])} "
        f"head(s) × 2 critics × {_f(z['kimg'], 3)} kimg ({round(z['kimg'] * 1000 / s['batch'])} steps of batch "
        f"{s['batch']}), evaluated after {', '.join(_f(p['kimg'], 3) for p in _first(d)['points'])} kimg on "
        f"{n_bins} × {z['n_eval']} generator and {n_bins} × {z['n_eval']} real samples.",
        "",
        "**How to read it.** SBA(λ) weights a sample by e^{−λl}; the engine divides by the mean weight in each of "
        f"{s['num_sigma_bins']} σ bins (`{s['normalize']}`), which cancels a per-bin offset, so the centred δ "
        "(each critic's bin mean removed) is the error that reaches the weights: one standard deviation of it "
        "multiplies a weight by e^{λδ}. δ = RMSE(l1 − l2)/√2 is each critic's own noise if the two errors are "
        "independent. The reproducible spread sd = √cov(l1, l2) is what two critics agree on; SNR = cov/δ²; the retest "
        "correlation of the weights e^{−λl} (r_w) falls below 0.5 exactly when their noise variance exceeds their "
        "reproducible variance: that is the rule for **dominated by noise** below. Reproducible is not correct: "
        "errors both critics share (the same start, the same data) are invisible to a test-retest; the analytic "
        "pair measures how large they are where the exact logit is known. The weights here are raw e^{−λl} (no "
        "weight cap; the sweep capped them at 5 after the bin normalisation).",
        "",
    ]
    lines += summary(d)
    for name, v in (all_data or {}).items():  # variants written beside this one (`--tag`)
        lines += [
            f"**Control `{name}`** ([{name}.md]({name}.md)): the same measurement with the generator frozen at "
            f"{_generator(v['setup'])}, {_f(v['sizes']['kimg'], 3)} kimg per critic:",
            "",
            *summary(v)[2:],
        ]
    lines += mnist_section(d) + gmm_section(d)
    lines += [f"![critic test-retest]({d['benchmark']}.png)"]
    return "\n".join(lines)
