"""The report page: `write_report(DIR)` turns a run's files (metrics.jsonl, samples.jsonl, its config)
into `DIR/report.html` and `DIR/plots/*.png`; given a folder of runs (the demo's), one page with a
section per run. It only reads files, so `tether report DIR` rebuilds exactly what training wrote.

The page is self-contained: each plot is embedded in it as a PNG data URI, so it shows its plots when copied,
moved or mailed on its own. The PNG files stay next to the runs for those who want the images.
"""

from __future__ import annotations

import base64
import html
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plots import Series, matplotlib_available, method_of, metric_series, plot_group, select_groups
from .runfiles import (
    METRICS_FILE,
    PLOTS_DIR,
    REPORT_FILE,
    RUNS_FILE,
    SAMPLES_FILE,
    read_jsonl,
    read_run_config,
)

SAMPLES_PER_STEP = 4
INSTALL_HINT = "pip install matplotlib"  # a dependency of tether: missing only from a broken or partial install
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: .5em; }
.plots img { width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
td.text { white-space: pre-wrap; max-width: 40em; }
pre { background: #f6f6f6; padding: .5em; overflow: auto; max-height: 30em; }
.note { color: #a40; }
"""


@dataclass
class Report:
    """What `write_report` wrote: the page, and each PNG with the data drawn in it."""

    path: Path
    plots: dict[Path, Series] = field(default_factory=dict)


def _runs(directory: Path) -> tuple[str | None, list[str], list[tuple[str, Path]]]:
    """(title, notes, [(run title, run folder)]) of a report: as saved by an earlier `write_report(...,
    runs=...)`, else the folder itself when it holds metrics.jsonl, else its subfolders that do (oldest
    metrics first, i.e. in the order they trained)."""
    if (directory / RUNS_FILE).is_file():
        with open(directory / RUNS_FILE, encoding="utf-8") as f:
            saved = json.load(f)
        return saved.get("title"), saved.get("notes", []), [(t, directory / d) for t, d in saved["runs"]]
    if (directory / METRICS_FILE).is_file():
        return None, [], [(directory.resolve().name, directory)]
    found = sorted((p for p in directory.iterdir() if (p / METRICS_FILE).is_file()),
                   key=lambda p: (p / METRICS_FILE).stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"No {METRICS_FILE} in {directory} or its subfolders, so there is nothing to report. Point it at a "
            "training run's output_dir (or at a folder of them, such as the demo's).")
    return None, [], [(p.name, p) for p in found]


def write_report(directory: str | os.PathLike, title: str | None = None, notes: list[str] | None = None,
                 runs: list[tuple[str, str | os.PathLike]] | None = None) -> Report:
    """Write `directory/report.html` (and each run's `plots/*.png`).

    `runs` makes one page over several runs, a section each (title, folder); it is saved with `title` and
    `notes` so that a later `write_report(directory)` (`tether report DIR`) rebuilds the same page.
    Without matplotlib the page has no plots and a warning says how to install it.
    """
    directory = Path(directory)
    if runs is not None:
        saved = {"title": title, "notes": notes or [],
                 "runs": [(t, os.path.relpath(Path(d), directory)) for t, d in runs]}
        with open(directory / RUNS_FILE, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)
    saved_title, saved_notes, sections = _runs(directory)
    title = title or saved_title or f"Training report: {sections[0][0] if len(sections) == 1 else directory.name}"
    notes = notes if notes is not None else saved_notes
    can_plot = matplotlib_available()
    if not can_plot:
        _warn_no_matplotlib(directory)
    report = Report(directory / REPORT_FILE)
    body = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        body.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if not can_plot:
        body.append(f'<p class="note">No plots: matplotlib is not installed. {html.escape(INSTALL_HINT)}</p>')
    for run_title, run_dir in sections:
        own = run_dir.resolve() == directory.resolve()  # the page of a single run needs no section title
        body.append(_run_section(directory, run_dir, None if own else run_title, can_plot, report))
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    report.path.write_text(page, encoding="utf-8")
    return report


_warned_no_matplotlib = False


def _warn_no_matplotlib(directory: Path) -> None:
    """Warn once per process: a trainer rebuilds its report after every log, and the demo has several."""
    global _warned_no_matplotlib
    if not _warned_no_matplotlib:
        _warned_no_matplotlib = True
        warnings.warn(f"matplotlib is not installed, so the report in {directory} (and any later one) has no plots. "
                      f"Fix: {INSTALL_HINT}", UserWarning, stacklevel=3)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _run_section(root: Path, run_dir: Path, title: str | None, can_plot: bool, report: Report) -> str:
    """One run's plots (embedded, each naming its PNG file relative to `root`), last values, samples and config,
    as HTML."""
    rows = read_jsonl(run_dir / METRICS_FILE)
    series = metric_series(rows)
    method, config_name, config_text = read_run_config(run_dir)
    method = method or method_of(list(series))
    out = [f"<section><h2>{html.escape(title)}</h2>" if title else "<section>",
           f"<p>{html.escape(str(run_dir))}: method <b>{html.escape(method or 'unknown')}</b>, "
           f"{len(rows)} logged rows.</p>"]
    if can_plot and series:
        plots_dir = run_dir / PLOTS_DIR
        plots_dir.mkdir(exist_ok=True)
        wanted = select_groups(method, list(series))
        for stale in set(plots_dir.glob("*.png")) - {plots_dir / f"{stem}.png" for stem, _, _ in wanted}:
            stale.unlink()  # from an earlier build whose metrics no longer apply
        images = []
        for stem, group, names in wanted:
            path = plots_dir / f"{stem}.png"
            report.plots[path] = plot_group(group.title, series, names, path)
            images.append(f'<img src="{_png_data_uri(path)}" alt="{html.escape(group.title)}" '
                          f'data-file="{html.escape(Path(os.path.relpath(path, root)).as_posix())}">')
        out.append('<div class="plots">' + "".join(images) + "</div>")
    if series:
        cells = "".join(f"<tr><td>{html.escape(name)}</td><td>{values[-1]:.6g}</td><td>{steps[-1]:g}</td></tr>"
                        for name, (steps, values) in sorted(series.items()))
        out.append(f"<details><summary>Last logged values ({len(series)} metrics)</summary><table>"
                   f"<tr><th>metric</th><th>value</th><th>step</th></tr>{cells}</table></details>")
    out.append(_samples_html(read_jsonl(run_dir / SAMPLES_FILE), run_dir))
    if config_name:
        out.append(f"<details><summary>Config ({html.escape(config_name)})</summary>"
                   f"<pre>{html.escape(config_text)}</pre></details>")
    out.append("</section>")
    return "\n".join(out)


def _text(value: Any) -> str:
    """A prompt or completion as text: conversations (lists of role/content messages) one turn a line."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in value)
    return str(value)


def _sample_cell(row: dict[str, Any], run_dir: Path | None) -> str:
    """The completion of a sample row as a table cell: its text, or the PNG its `image` names (a path relative
    to the run's folder, as DDPO writes them), embedded."""
    image = row.get("image")
    if image and run_dir is not None and (run_dir / image).is_file():
        return (f'<td><img src="{_png_data_uri(run_dir / image)}" alt="{html.escape(str(image))}" width="128" '
                f'style="image-rendering: pixelated"></td>')
    return f'<td class="text">{html.escape(_text(row.get("completion", "")))}</td>'


def _samples_html(rows: list[dict[str, Any]], run_dir: Path | None = None) -> str:
    """A table of sample generations: those of the first and the last logged step, a few each."""
    if not rows:
        return ""
    steps = sorted({r["step"] for r in rows if "step" in r})
    shown_steps = steps[:1] + steps[-1:] if len(steps) > 1 else steps
    # The last rows of a step: a resumed run writes again the samples of the steps after its checkpoint.
    shown = ([r for s in shown_steps for r in [r for r in rows if r.get("step") == s][-SAMPLES_PER_STEP:]]
             if shown_steps else rows[:SAMPLES_PER_STEP])
    has_reward = any("reward" in r for r in shown)
    header = ("<th>step</th>" if steps else "") + "<th>prompt</th>" + (
        "<th>image</th>" if any("image" in r for r in shown) else "<th>completion</th>") + (
        "<th>reward</th>" if has_reward else "")
    lines = []
    for row in shown:
        cells = f"<td>{html.escape(str(row.get('step', '')))}</td>" if steps else ""
        cells += f'<td class="text">{html.escape(_text(row.get("prompt", "")))}</td>' + _sample_cell(row, run_dir)
        if has_reward:
            reward = row.get("reward")
            cells += f"<td>{reward:.4g}</td>" if isinstance(reward, (int, float)) else "<td></td>"
        lines.append(f"<tr>{cells}</tr>")
    return f"<h3>Sample generations</h3><table><tr>{header}</tr>{''.join(lines)}</table>"
