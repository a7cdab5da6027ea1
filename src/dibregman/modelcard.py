"""A model card, `README.md`, beside every export (written by `DiBregman.export`): what a user of the weights needs,
read from the run's own records and never typed by hand:

- the teacher spec (the base model of a LoRA export) and the guidance it was distilled with;
- the divergence and its parameters (the saved config's `divergence` section);
- the images seen (the export's `num_images`);
- the measured FIDs with their protocol, feature network, n and reference: every evaluation record in the run
  folder (`dibregman eval --run RUN` writes `fid_curve.json`, `dibregman eval --checkpoint RUN --out RUN/X.json` one
  result); a curve contributes its newest snapshot; in-loop numbers without a protocol are not listed;
- the sampling code: a few lines of stock diffusers for a text-to-image LoRA (the scheduler settings the export
  records), one `dibregman sample` command otherwise;
- the licence of the teacher's own model card (`license:` in the YAML front matter of the README.md in the teacher's
  folder or beside its file), when it has one.
`refresh(run_dir)` rewrites the card of a run's export after a new evaluation (`evaluate_run` calls it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CARD = "README.md"


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def export_meta(export: Path) -> dict:
    """The description of an export: `<folder>/dibregman.json` or `<weights>.json`."""
    export = Path(export)
    meta = _read_json(export / "dibregman.json" if export.is_dir() else export.with_suffix(".json"))
    if not isinstance(meta, dict):
        raise ValueError(f"{export}: no readable export description beside it")
    return meta


def _record(row: dict, source: str) -> dict:
    keys = ("fid", "protocol", "feature_net", "n_samples", "reference")
    return {**{k: row.get(k) for k in keys}, "kimg": row.get("kimg"), "source": source}


def fid_records(run_dir: str | Path) -> list[dict]:
    """FIDs recorded in a run folder's JSON files (evaluation results and FID curves), with protocol, n, reference;
    a curve gives its newest snapshot."""
    out = []
    for path in sorted(Path(run_dir).glob("*.json")):
        data = _read_json(path)
        if not isinstance(data, dict):
            continue
        rows = data.get("rows")
        if isinstance(rows, list) and rows and all(isinstance(r, dict) and "fid" in r for r in rows):
            out.append(_record(max(rows, key=lambda r: r.get("num_images", 0)), path.name))
        elif "fid" in data and "protocol" in data and "n_samples" in data:
            out.append(_record(data, path.name))
    return out


def teacher_licence(spec: str) -> str | None:
    """`license:` of the teacher's model card (README.md front matter in its folder or beside its file)."""
    from .teachers import resolve_path

    path = Path(resolve_path(spec).partition(":")[2])
    card = (path if path.is_dir() else path.parent) / CARD
    if not path.exists() or not card.is_file():
        return None
    lines = card.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def _call_args(call: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in call.items())


def sampling_code(meta: dict, folder: Path) -> tuple[str, str]:
    """(language, code) to sample the exported student: stock diffusers for a text-to-image LoRA, else a command."""
    recipe = meta.get("diffusers")
    if meta.get("format") != "lora" or not recipe:  # `dibregman sample` reads every export kind
        prompt = ' --prompt "a photo of a cat"' if meta.get("kind") == "dibregman-one-step-text-to-image" else ""
        return "bash", f"dibregman sample --checkpoint {folder}{prompt} --num 16 --out samples.png"
    base = meta["base_model"].partition(":")[2]
    sched = recipe["scheduler"]
    lines = [
        *(["import torch"] if recipe["latents_scale"] != 1.0 else []),
        f"from diffusers import {recipe['pipeline']}, {sched['class']}",
        "",
        f'pipe = {recipe["pipeline"]}.from_pretrained("{base}")',
        f"pipe.scheduler = {sched['class']}.from_config(pipe.scheduler.config, {_call_args(sched['config'])})",
        f'pipe.load_lora_weights("{folder}")  # this folder',
    ]
    call = _call_args(recipe["call"])
    if recipe["latents_scale"] == 1.0:
        lines.append(f'image = pipe("a photo of a cat", {call}).images[0]  # one step')
        return "python", "\n".join(lines)
    c, h, w = meta["shape"]
    z = f"{recipe['latents_scale']!r} * torch.randn(1, {c}, {h}, {w})"
    if recipe.get("latents_packed"):
        z = f"pipe._pack_latents({z}, 1, {c}, {h}, {w})"
    lines.append(f"latents = {z}  # the student's input: t * N(0, I)")
    lines.append(f'image = pipe("a photo of a cat", latents=latents, {call}).images[0]  # one step')
    return "python", "\n".join(lines)


def _divergence(cfg: dict) -> str:
    from .config import saved_divergence_params

    section = cfg.get("divergence", {})
    params = saved_divergence_params(section)
    head = f"`{section.get('name')}`" + (f" ({', '.join(f'{k} = {v}' for k, v in params.items())})" if params else "")
    rest = ", ".join(f"{k} = {v}" for k, v in section.items() if k != "name" and k not in params)
    return f"{head}; stabilisation: {rest}" if rest else head


def _student(meta: dict) -> str:
    steps = f"{meta.get('num_steps', 1)} step from sigma_init = {meta['sigma_init']}"
    lora = meta.get("lora")
    if lora:
        layers = ", ".join(lora["target_modules"])
        return f"LoRA rank {lora['rank']} (alpha {lora['alpha']}) on the {lora['network_class']}'s {layers}; {steps}"
    return f"full weights; {steps}"


def _fid_table(records: list[dict]) -> list[str]:
    if not records:
        return ["No FID is recorded in the run folder yet. `dibregman eval --run RUN --every-ckpt` (or `eval "
                "--checkpoint RUN --out RUN/fid.json`) writes one, and the card is rewritten with it."]  # fmt: skip
    rows = ["| FID | protocol | feature net | n | reference | kimg | record |", "|---|---|---|---|---|---|---|"]
    for r in records:
        kimg = "" if r["kimg"] is None else f"{r['kimg']:g}"
        rows.append(f"| {r['fid']:.3f} | {r['protocol']} | {r['feature_net']} | {r['n_samples']} | "
                    f"{r['reference']} | {kimg} | `{r['source']}` |")  # fmt: skip
    return rows


def render(meta: dict, export: Path, records: list[dict], licence: str | None) -> str:
    """The card's Markdown for the export at `export` (a folder, or a weights file)."""
    folder = export if export.is_dir() else export.parent
    cfg = meta.get("distill_config", {})
    teacher = meta.get("teacher") or cfg.get("model", {}).get("teacher")
    lora = meta.get("format") == "lora"
    tags = "tags: [dibregman, one-step, distillation" + (", lora]" if lora else "]")
    library = f"library_name: {'diffusers' if meta.get('diffusers') else 'dibregman'}"
    front = ["---", library, f"license: {licence or 'other'}", tags, "---"]
    guidance = (
        cfg.get("model", {}).get("guidance_scale") if meta.get("kind") == "dibregman-one-step-text-to-image" else None
    )
    lang, code = sampling_code(meta, folder)
    body = [
        f"# One-step student of `{teacher}` (Di-Bregman distillation)",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{teacher}`"
        + (f" (classifier-free guidance {guidance} while distilling)" if guidance else "")
        + " |",
        f"| student | {_student(meta)} |",
        f"| divergence | {_divergence(cfg)} |",
        f"| images seen | {meta.get('num_images')} |",
        f"| weights | `{meta['lora']['weights']}` (adapters only; the base is the teacher) |"
        if lora
        else f"| weights | `{export.name}` (full weights) |",  # fmt: skip
        "",
        "## Measured FID",
        "",
        *_fid_table(records),
        "",
        "## Sampling",
        "",
        f"```{lang}",
        code,
        "```",
        "",
        "## Licence",
        "",
        f"`{licence}`, copied from the teacher's model card."
        if licence
        else "The teacher's model card states no licence here; the teacher's terms apply to these weights.",
        "",
    ]
    return "\n".join(front + [""] + body)


def write_card(export: str | Path, run_dir: str | Path) -> Path:
    """Write README.md beside an export (in its folder, or beside its weights file) atomically; returns its path."""
    export = Path(export)
    meta = export_meta(export)
    folder = export if export.is_dir() else export.parent
    teacher = meta.get("teacher") or meta.get("distill_config", {}).get("model", {}).get("teacher", "")
    text = render(meta, export, fid_records(run_dir), teacher_licence(teacher) if teacher else None)
    path = folder / CARD
    tmp = path.with_name(f"{CARD}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def refresh(run_dir: str | Path) -> Path | None:
    """Rewrite the card of a run folder's export (none: None), e.g. after `dibregman eval --run` wrote a curve."""
    from .export import find_export

    run_dir = Path(run_dir)
    export = find_export(run_dir) or (run_dir / "generator.safetensors")
    return write_card(export, run_dir) if export.exists() else None


__all__ = ["write_card", "refresh", "fid_records", "teacher_licence", "sampling_code", "render"]
