"""`codexmini report RUN`: a table over a run's stages and a size-vs-perplexity plot."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_path, write_atomic

COLUMNS = ("stage", "parameters", "file MB", "bits/weight", "val ppl", "tokens/s", "wall s")


def collect(run_dir: Path) -> list[dict]:
    rows = []
    for folder in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()):
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            continue
        m = json.loads(manifest_path.read_text())
        met = m["metrics"]
        rows.append({
            "stage": folder.name, "parameters": met.get("parameters"),
            "file MB": met["file_bytes"] / 2 ** 20 if met.get("file_bytes") else None,
            "bits/weight": met.get("bits_per_weight"), "val ppl": met.get("val_ppl"),
            "tokens/s": met.get("runtime_tokens_per_s") or met.get("generate_tokens_per_s"),
            "wall s": m.get("wall_time_s"), "teacher_val_ppl": met.get("teacher_val_ppl"),
            "sample": met.get("sample"), "new_model": "model.safetensors" in (m.get("outputs") or {}),
            "domains": met.get("domains"), "teacher_domains": met.get("teacher_domains"),
            "schemes": (met.get("quantize") or {}).get("schemes"),
            "allocation": (met.get("quantize") or {}).get("allocation"),
        })
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no completed stages (no manifest.json in its sub-folders)")
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def render(rows: list[dict]) -> str:
    table = [[_fmt(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(t) for t in table]
    teacher = next((r["teacher_val_ppl"] for r in rows if r.get("teacher_val_ppl")), None)
    if teacher:
        out.append(f"teacher val ppl: {teacher:.2f}")
    sample = next((r["sample"] for r in reversed(rows) if r.get("sample")), None)
    if sample is not None:
        out.append(f"last sample: {sample!r}")
    domains = render_domains(rows)
    if domains:
        out += ["", domains]
    schemes = render_schemes(rows)
    if schemes:
        out += ["", schemes]
    return "\n".join(out)


def render_schemes(rows: list[dict]) -> str:
    """Which scheme each quantized tensor got, counted per scheme and per kind of tensor (q/k/v/o, MLP, table),
    with a size budget's totals when the schemes were allocated."""
    lines = []
    for r in rows:
        if not r.get("schemes"):
            continue
        kinds: dict[str, dict[str, int]] = {}
        for name, scheme in r["schemes"].items():
            kind = name.rsplit(".", 1)[-1] if name.startswith("model.layers.") else name
            kinds.setdefault(kind, {}).setdefault(scheme, 0)
            kinds[kind][scheme] += 1
        all_schemes = sorted({s for k in kinds.values() for s in k})
        lines.append(f"schemes of {r['stage']}:")
        lines.append("| tensor | " + " | ".join(all_schemes) + " |")
        lines.append("|---|" + "---|" * len(all_schemes))
        for kind in sorted(kinds):
            lines.append(f"| {kind} | " + " | ".join(str(kinds[kind].get(s, "")) for s in all_schemes) + " |")
        a = r.get("allocation")
        if a:
            lines.append(f"allocated within {a['budget_mb']:.2f} MB for these tensors: {a['quantized_mb']:.2f} MB, "
                         f"estimated loss increase {a['estimated_loss_increase']:.4g}")
    return "\n".join(lines)


def render_domains(rows: list[dict]) -> str:
    """Per-domain perplexity as a ratio to the teacher's, and KL divergence from the teacher, stage by stage: what
    a student forgets outside its training data shows here (empty when the run has one domain)."""
    teacher = next((r["teacher_domains"] for r in rows if r.get("teacher_domains")), None) or {}
    names = sorted({d for r in rows for d in (r.get("domains") or {})})
    if len(names) < 2:
        return ""
    head = ["stage", *(f"{d} ppl/teacher" for d in names), *(f"{d} KL" for d in names)]
    table = []
    for r in rows:
        dom = r.get("domains") or {}
        if not dom:
            continue
        ratios = [_fmt(dom[d]["ppl"] / teacher[d]["ppl"]) if d in dom and d in teacher else _fmt(None) for d in names]
        kls = [_fmt(dom[d].get("kl")) if d in dom else _fmt(None) for d in names]
        table.append([r["stage"], *ratios, *kls])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(t) for t in table]
    if teacher:
        lines.append("teacher ppl: " + ", ".join(f"{d} {teacher[d]['ppl']:.2f}" for d in names if d in teacher))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Size (MB) vs validation perplexity per stage; needs matplotlib (extra: report)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install 'codexmini[report]' for matplotlib")
        return None
    # Only stages that wrote a model of their own (eval / generate reuse the previous one).
    pts = [(r["file MB"], r["val ppl"], r["stage"]) for r in rows if r["new_model"] and r["file MB"] and r["val ppl"]]
    per_domain = _domain_series(rows)
    fig, axes = plt.subplots(1, 2 if per_domain else 1, figsize=(12 if per_domain else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    teacher = next((r["teacher_val_ppl"] for r in rows if r.get("teacher_val_ppl")), None)
    if teacher:
        ax.axhline(teacher, linestyle="--", color="gray", label=f"teacher ({teacher:.2f})")
        ax.legend()
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("model file size (MB)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title("size vs perplexity across stages")
    if per_domain:
        stages, series = per_domain
        ax = axes[0][1]
        for name, ratios in series.items():
            ax.plot(range(len(stages)), ratios, "o-", label=name)
        ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("perplexity / teacher's")
        ax.set_title("per domain (held out)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _domain_series(rows: list[dict]):
    """(stage names, {domain: perplexity ratio to the teacher per stage}) when a run measures several domains."""
    teacher = next((r["teacher_domains"] for r in rows if r.get("teacher_domains")), None) or {}
    staged = [r for r in rows if r.get("domains")]
    names = sorted({d for r in staged for d in r["domains"] if d in teacher})
    if len(names) < 2:
        return None
    series = {d: [r["domains"][d]["ppl"] / teacher[d]["ppl"] if d in r["domains"] else float("nan") for r in staged]
              for d in names}
    return [r["stage"] for r in staged], series


def report(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    rows = collect(run_dir)
    text = render(rows)
    write_atomic(run_dir / "report.md", text + "\n")
    png = plot(rows, run_dir / "report.png")
    return text + (f"\nplot: {png}" if png else "")
