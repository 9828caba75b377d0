"""Reports in the project's format: NAME.json {"meta": {...}, "rows": [...]}, NAME.md, and
the long-context plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class MissingDependency(ValueError):
    """An optional package is not installed (exit status 2 in the CLI)."""


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency(
            "the plots need matplotlib, which is not installed: pip install 'fastdecode[bench]' "
            "(or pip install matplotlib), or pass --no-plots for JSON and Markdown only"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _commit() -> str:
    commit = os.environ.get("FASTDECODE_COMMIT")
    if commit:
        return commit
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short=7", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def meta(command: str, device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "commit": _commit(),
        **(extra or {}),
    }


def header_lines(
    title: str, m: dict[str, Any], *, details: tuple[str, ...] = (), command_prefix: str = ""
) -> list[str]:
    """The lines a GPU benchmark report opens with: what ran, on which card (plus `details`),
    with which versions, when, from which commit, and the command that produced it."""
    return [
        f"# {title} ({', '.join((m['gpu'], *details))})",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, {m['date']}, commit {m['commit']}",
        f"{command_prefix}command: `{m['command']}`",
    ]


def write_table_report(
    out: Path,
    name: str,
    title: str,
    rows: list[dict],
    columns: list[str],
    description: str,
    *,
    details: tuple[str, ...] = (),
) -> None:
    """NAME.json (meta + rows) and NAME.md (header, description, table) of a benchmark run,
    rewritten as rows come in (a run cut short still leaves its results)."""
    import sys

    import torch

    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"meta": meta("python " + " ".join(sys.argv), device), "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        *header_lines(title, report["meta"], details=details),
        "",
        description,
        "",
        *table_lines(rows, columns),
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def table_lines(rows: list[dict], columns: list[str], error: bool = True) -> list[str]:
    """A Markdown table of `rows` (dicts) over `columns` (missing values left blank), plus an
    `error` column for rows that failed when `error` is set."""
    head = columns + (["error"] if error else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ["" if row.get(c) is None else str(row[c]) for c in columns]
        if error:
            cells.append(str(row.get("error", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- aggregation -------------------------------------------------------------------------------
def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _lengths(rows: list[dict]) -> list[int]:
    return sorted({r["length"] for r in rows})


def needle_accuracy(rows: list[dict], method: str, length: int | None = None) -> float | None:
    cells = [
        r
        for r in rows
        if r["workload"] == "needle"
        and r["method"] == method
        and (length is None or r["length"] == length)
    ]
    if not cells:
        return None
    return sum(r["quality"]["correct"] for r in cells) / sum(r["cases"] for r in cells)


def _metric(rows, workload, method, key, length=None) -> float | None:
    vals = [
        r["quality"][key]
        for r in rows
        if r["workload"] == workload
        and r["method"] == method
        and (length is None or r["length"] == length)
    ]
    if not vals:
        return None
    if key == "ppl":  # geometric mean over lengths
        return math.exp(sum(math.log(v) for v in vals) / len(vals))
    return sum(vals) / len(vals)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# -- Markdown ----------------------------------------------------------------------------------
def markdown(report: dict, name: str, images: list[str]) -> str:
    m, rows = report["meta"], report["rows"]
    methods, lengths = _methods(rows), _lengths(rows)
    lines = [
        f"# Long-context quality: {m.get('model', '?')} ({m['gpu']})",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, {m['date']}, "
        f"commit {m['commit']}, {m.get('dtype', '')}, wall {m.get('wall_s', '?')} s",
        f"command: `{m['command']}`",
        "",
    ]
    if m.get("note"):
        lines += [m["note"], ""]
    lines += [
        "Filler: "
        + str(m.get("filler", ""))
        + f"; passkeys seeded ({m.get('seed')}); {m.get('needles_per_cell')} needles per "
        f"(length, depth) cell; greedy. `length` = prompt + new tokens; a budget is a "
        "fraction of it. `kv slots`: KV entries per layer and KV head a decode step can "
        "attend to: the slots an evicting cache allocated (SnapKV and H2O add the new "
        "tokens to the budget), the entries a selective one reads per step (Quest and "
        "TidalDecode store the whole cache). Agreement: fraction of the first "
        f"{m.get('agreement_tokens')} greedy tokens equal to full attention's, and the mean "
        f"common prefix. Perplexity: last {m.get('ppl_tokens')} tokens of each window, "
        "scored step by step through the decode path after a prefill through the policy.",
        "",
        "## Summary",
        "",
        "| method | length | kv slots | needle accuracy | agreement | common prefix | ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        for length in lengths:
            same = [r for r in rows if r["method"] == method and r["length"] == length]
            slots = same[0].get("kv_slots") if same else None
            lines.append(
                f"| {method} | {length} | {_fmt(slots)} "
                f"| {_fmt(needle_accuracy(rows, method, length), 2)} "
                f"| {_fmt(_metric(rows, 'agreement', method, 'agreement', length))} "
                f"| {_fmt(_metric(rows, 'agreement', method, 'common_prefix', length), 1)} "
                f"| {_fmt(_metric(rows, 'ppl', method, 'ppl', length), 2)} |"
            )
    depths = sorted({r["depth"] for r in rows if r["workload"] == "needle"})
    if depths:
        lines += [
            "",
            "## Needle accuracy by depth",
            "",
            "| method | length | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
            "|---|---|" + "---|" * len(depths),
        ]
        for method in methods:
            for length in lengths:
                cells = {
                    r["depth"]: r["quality"]["accuracy"]
                    for r in rows
                    if r["workload"] == "needle" and r["method"] == method and r["length"] == length
                }
                if cells:
                    row = " | ".join(_fmt(cells.get(d), 2) for d in depths)
                    lines.append(f"| {method} | {length} | {row} |")
    if images:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(i).stem}]({Path(i).name})" for i in images]
    lines += ["", f"Rows with every answer and passkey: `{name}.json`."]
    return "\n".join(lines) + "\n"


# -- plots -------------------------------------------------------------------------------------
def _budget_methods(rows: list[dict]) -> dict[str, list[tuple[float, str]]]:
    """policy -> [(budget, method name)] in descending budget order."""
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for method in _methods(rows):
        r = next(r for r in rows if r["method"] == method)
        if r["policy"] is not None:
            out[r["policy"]].append((r["budget"], method))
    return {p: sorted(v, reverse=True) for p, v in out.items()}


def plot_heatmaps(rows: list[dict], out: Path, name: str) -> list[Path]:
    """One PNG per policy: needle accuracy, depth (rows) x length (columns), a panel for
    full attention and one per budget."""
    plt = require_matplotlib()
    needle = [r for r in rows if r["workload"] == "needle"]
    if not needle:
        return []
    lengths = _lengths(needle)
    depths = sorted({r["depth"] for r in needle})
    paths = []
    for policy, entries in _budget_methods(needle).items():
        panels = [("full attention", "full")] + [(m, m) for _, m in entries]
        fig, axes = plt.subplots(
            1,
            len(panels),
            figsize=(1.6 + (0.8 + 0.7 * len(lengths)) * len(panels), 1.4 + 0.4 * len(depths)),
            squeeze=False,
            sharey=True,
        )
        image = None
        for ax, (title, method) in zip(axes[0], panels, strict=True):
            grid = [[math.nan] * len(lengths) for _ in depths]
            for r in needle:
                if r["method"] == method:
                    grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["quality"][
                        "accuracy"
                    ]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not math.isnan(grid[i][j]):
                        ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        fig.supxlabel("context length (tokens)", fontsize=8)
        axes[0][0].set_ylabel("needle depth", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        fig.suptitle(f"{rows[0]['model']}: needle accuracy, {policy}", fontsize=10, y=1.06)
        path = out / f"{name}_heatmap_{policy}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_budget_curves(rows: list[dict], out: Path, name: str) -> Path | None:
    """NAME.png: each workload's quality against the budget, a line per policy, full
    attention dashed (means over the lengths; perplexity a geometric mean)."""
    plt = require_matplotlib()
    panels = [
        (w, key, label)
        for w, key, label in (
            ("needle", "accuracy", "needle accuracy"),
            ("agreement", "agreement", "greedy agreement with full"),
            ("ppl", "ppl", "perplexity"),
        )
        if any(r["workload"] == w for r in rows)
    ]
    policies = _budget_methods(rows)
    if not panels or not policies:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (workload, key, label) in zip(axes[0], panels, strict=True):

        def value(method, workload=workload, key=key):
            if workload == "needle":
                return needle_accuracy(rows, method)
            return _metric(rows, workload, method, key)

        for policy, entries in policies.items():
            pts = [(b, value(m)) for b, m in entries if value(m) is not None]
            if pts:
                ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=policy)
        full = value("full")
        if full is not None:
            ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full")
        budgets = sorted({b for entries in policies.values() for b, _ in entries})
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [_budget_text(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("KV budget (fraction of the context)")
        ax.set_title(label, fontsize=10)
        if workload != "ppl":
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    lengths = ", ".join(str(n) for n in _lengths(rows))
    fig.suptitle(f"{rows[0]['model']}: quality vs KV budget (lengths {lengths})", fontsize=10)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _budget_text(b: float) -> str:
    inverse = 1 / b
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{b:g}"


def write(report: dict, out: Path, name: str, *, plots: bool = True) -> list[Path]:
    """Write NAME.json, the plots and NAME.md into `out`; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    images: list[Path] = []
    if plots:
        curve = plot_budget_curves(report["rows"], out, name)
        images += ([curve] if curve else []) + plot_heatmaps(report["rows"], out, name)
    md = out / f"{name}.md"
    md.write_text(markdown(report, name, [str(i) for i in images]))
    return [*paths, md, *images]
