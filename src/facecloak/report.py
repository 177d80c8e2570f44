"""Render an `EvaluationResult` as JSON and as one self-contained HTML file; compute nothing new.

The HTML embeds its plots (matplotlib, PNG as base64) and example image pairs with a magnified
difference image, so it opens anywhere without network or side files.
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from facecloak import io
from facecloak.evaluate import EvaluationResult, EvaluationRow
from facecloak.evaluate.uploads import UPLOAD_DESCRIPTIONS, UPLOAD_JPEG_QUALITY
from facecloak.io import to_uint8

DIFFERENCE_GAIN = 10.0
"""Difference images show |protected - original| magnified this many times."""


def write_json(result: EvaluationResult, path: Path) -> Path:
    """Write every figure and setting as strict JSON (atomically).

    A figure that has no value (control rank-1 without control people, a rate over nothing) is
    ``null``, not ``NaN``, which JSON does not have and strict parsers (``jq``, browsers) refuse.
    """
    data = _without_non_finite(json.loads(json.dumps(result.to_dict(), default=_json_default)))
    return _atomic_text(path, json.dumps(data, indent=2, allow_nan=False))


def _without_non_finite(value):
    """``value`` with every NaN or infinite float, at any depth, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_non_finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_non_finite(item) for item in value]
    return value


def write_html(result: EvaluationResult, path: Path) -> Path:
    """Write the self-contained HTML report (atomically)."""
    return _atomic_text(path, render_html(result))


def _atomic_text(path: Path, text: str) -> Path:
    return io.write_bytes_atomic(path, text.encode("utf-8"), overwrite=True)


def _json_default(value):
    """What ``json`` cannot write itself (floats it writes: `_without_non_finite` handles NaN)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    return str(value)


def _png(array: np.ndarray) -> str:
    buffer = _bytes_io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _figure_png(figure) -> str:
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(key))}</td>" for key, _ in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PROBES_FOUND = {"protected_probes_found": "protected_probes", "control_probes_found": "control_probes"}
"""Columns shown as "found/probes": a probe the attacker finds no face in is a miss."""


def _cell(row: EvaluationRow, name: str):
    """A row's value as a table shows it: probes found as "3/4", no adaptive variant as "-"."""
    value = getattr(row, name)
    if name in PROBES_FOUND:
        return "-" if value is None else f"{value}/{getattr(row, PROBES_FOUND[name])}"
    if value is None or (name == "adaptive" and value is False):
        return "-"
    return value


def _row_table(rows: list[EvaluationRow], columns: list[tuple[str, str]]) -> str:
    """`_table` for result rows: columns name `EvaluationRow` attributes."""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(_cell(row, name))}</td>" for name, _ in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


ROW_COLUMNS = [
    ("upload", "upload"),
    ("adaptive", "adaptive attacker"),
    ("protection", "protection (1 - rank-1)"),
    ("protected_rank1", "protected rank-1"),
    ("protected_rank5", "protected rank-5"),
    ("control_rank1", "control rank-1"),
    ("control_rank5", "control rank-5"),
    ("tar_at_far_1e3", "TAR @ FAR 1e-3"),
    ("protected_probes_found", "protected probes with a face found"),
    ("control_probes_found", "control probes with a face found"),
    ("protected_gallery_faces_found", "protected gallery faces found"),
]


JPEG_UPLOADS = (("none", 100),) + tuple(
    (name, quality) for name, quality in UPLOAD_JPEG_QUALITY.items() if name.startswith("jpeg")
)
"""The uploads of the protection-vs-JPEG figure, with the JPEG quality each stands at (no re-encode:
100; `facecloak.evaluate.uploads.UPLOAD_JPEG_QUALITY` for the others)."""


def jpeg_curves(result: EvaluationResult) -> dict[str, list[tuple[int, float]]]:
    """The protection-vs-JPEG figure's lines: (quality, protection) by label, non-adaptive rows.

    One line per attacker, or per attacker and level after a level sweep (``--level all``): the
    levels' rows, all on one line, made it zigzag between them at each quality.
    """
    levels = list(dict.fromkeys(row.level for row in result.rows if row.level not in (None, "-")))
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in result.rows:
        quality = dict(JPEG_UPLOADS).get(row.upload)
        if quality is None or row.adaptive:
            continue
        label = row.attacker if len(levels) < 2 else f"{row.attacker} ({row.level})"
        curves.setdefault(label, []).append((quality, row.protection))
    return {label: sorted(points) for label, points in curves.items()}


def plots(result: EvaluationResult) -> dict[str, str]:
    """The report's figures, as base64 PNG by name (empty if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    figures: dict[str, str] = {}
    curves = jpeg_curves(result)
    if curves:  # only uploads of no single JPEG quality (downscale, blur): an empty figure was drawn
        figure, axis = plt.subplots(figsize=(6, 3.6))
        for label, points in curves.items():
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.set_xlabel("JPEG quality of the upload (100 = no re-encode)")
        axis.set_ylabel("protection (1 - rank-1)")
        axis.set_ylim(-0.02, 1.02)
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        axis.set_title("Protection vs JPEG re-compression")
        figures["protection_vs_jpeg"] = _figure_png(figure)

    for attacker, entry in result.distances.items():
        figure, axis = plt.subplots(figsize=(6, 3.6))
        bins = 40
        for key, label in (
            ("clean_genuine", "same person, clean vs clean"),
            (
                "protected_vs_own_clean",
                f"protected vs its own clean photo ({entry.get('protected_upload', '')})",
            ),
            ("impostor", "different people"),
        ):
            values = entry.get(key) or []
            if values:
                axis.hist(values, bins=bins, alpha=0.5, density=True, label=label)
        axis.axvline(entry.get("threshold", 0), color="k", linestyle="--", label="match threshold")
        axis.set_xlabel(f"{entry.get('metric', '')} distance")
        axis.set_title(f"Distances on {attacker}{_quality_level(result)}")
        axis.legend(fontsize=7)
        figures[f"distances_{attacker}"] = _figure_png(figure)

    levels = result.settings.get("level_sweep")
    if levels and any(level["rows"] for level in levels):
        figure, axis = plt.subplots(figsize=(6, 3.6))
        for attacker in sorted({row["attacker"] for level in levels for row in level["rows"]}):
            xs = [level["dssim"] for level in levels]
            ys = [
                next((r["protection"] for r in level["rows"] if r["attacker"] == attacker), math.nan)
                for level in levels
            ]
            axis.plot(xs, ys, marker="o", label=attacker)
            for level, x, y in zip(levels, xs, ys):
                axis.annotate(level["level"], (x, y), fontsize=7)
        axis.set_xlabel("mean face DSSIM")
        axis.set_ylabel(f"protection after {levels[0].get('upload', 'jpeg75')}")
        axis.set_title("Quality vs protection per level")
        axis.legend(fontsize=8)
        figures["quality_vs_protection"] = _figure_png(figure)
    return figures


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
    "img{max-width:100%}.pair img{width:24%;margin-right:1%}.note{color:#555}"
)
LEAVE_ONE_OUT_COLUMNS = [
    ("left_out", "model left out"),
    ("cloaked_with", "cloaked with"),
    ("upload", "upload"),
    ("protection", "protection"),
    ("control_rank1", "control rank-1"),
]


def render_html(result: EvaluationResult) -> str:
    """The whole report as one HTML string."""
    settings = {key: value for key, value in result.settings.items() if key != "level_sweep"}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>facecloak evaluation</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>facecloak evaluation: {html.escape(str(settings.get('method')))}</h1>",
        f"<p class='note'>{html.escape(_summary_line(result))}</p>",
        # ensure_ascii=False: a person named Zoë was shown as "Zo\u00eb" (the page is UTF-8)
        "<h2>Settings</h2><pre>"
        f"{html.escape(json.dumps(settings, indent=1, default=str, ensure_ascii=False))}</pre>",
    ]
    columns = (
        [("level", "level")] if any(row.level is not None for row in result.rows) else []
    ) + ROW_COLUMNS
    parts.append("<h2>Upload transforms</h2><ul>")
    parts += [
        f"<li><code>{html.escape(name)}</code>: {html.escape(description)}</li>"
        for name, description in _upload_descriptions(result).items()
    ]
    parts.append("</ul>")
    for attacker in dict.fromkeys(row.attacker for row in result.rows):
        rows = [row for row in result.rows if row.attacker == attacker]
        parts.append(f"<h2>Attacker: {html.escape(attacker)}</h2>{_row_table(rows, columns)}")
        parts += [f"<p class='note'>{html.escape(note)}</p>" for note in _missed_probe_notes(rows)]
    if result.settings.get("leave_one_out"):
        parts.append("<h2>Leave-one-out: cloaked without the model, measured on it</h2>")
        parts.append(_table(result.settings["leave_one_out"], LEAVE_ONE_OUT_COLUMNS))
    parts += _quality_section(result)
    figures = plots(result)
    if figures:
        parts.append("<h2>Plots</h2>")
        for name, data in figures.items():
            title = html.escape(name.replace("_", " "))
            parts.append(
                f"<h3>{title}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
            )
    parts += _examples_section(result.examples, _quality_level(result))
    parts.append(
        f"<p class='note'>timings{html.escape(_quality_level(result))}: "
        f"{html.escape(json.dumps(result.timings))}</p></body></html>"
    )
    return "\n".join(parts)


QUALITY_MEASURES = (("dssim", "DSSIM"), ("psnr", "PSNR (dB)"), ("linf", "L-inf (of 255)"))
QUALITY_DIGITS = {"dssim": 4, "psnr": 1, "linf": 0}
"""Digits each measure is shown with, as the terminal shows it (a DSSIM of 0.0014 read 0.001)."""


def _quality_figure(measure: str, value) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{QUALITY_DIGITS[measure]}f}"


def _quality_section(result: EvaluationResult) -> list[str]:
    quality = result.quality
    if not quality:
        return []
    at_level = _quality_level(result)
    rows = [
        {"measure": title, **{stat: _quality_figure(key, quality[key][stat]) for stat in ("mean", "max")}}
        for key, title in QUALITY_MEASURES
        if key in quality
    ]
    parts = [
        f"<h2>Image quality of the protected photos{html.escape(at_level)} (whole photo)</h2>",
        _table(rows, [("measure", "measure"), ("mean", "mean"), ("max", "max")]),
    ]
    psnr = quality.get("per_photo", {}).get("psnr", [])
    if any(value is None or not math.isfinite(value) for value in psnr):  # the table's mean leaves them out
        parts.append(f"<p class='note'>{html.escape(_psnr_text(quality))}</p>")
    if "face_dssim" in quality:
        face = quality["face_dssim"]
        parts.append(
            f"<p>Face DSSIM{html.escape(at_level)} (the cloak's budget, over each face's detection box): "
            f"mean {face['mean']:.4f}, max {face['max']:.4f}; "
            f"{html.escape(_cloak_check(quality))}.</p>"
        )
    lines = _photo_notes(quality) + _level_sweep_lines(result) + _realism_lines(quality)
    parts += [f"<p>{html.escape(line)}</p>" for line in lines]
    return parts


def _photo_notes(quality: dict) -> list[str]:
    """Protected photos the figures above leave out, and those the protection found no face in.

    Both were silent: the quality read as that of every photo, and a photo left as it was (no
    face to protect) went into the gallery unprotected with no word of it.
    """
    lines = []
    other_size = quality.get("photos_of_another_size")
    if other_size and quality.get("photos"):
        lines.append(
            f"quality: {other_size} of {other_size + quality['photos']} protected photos have another "
            "size than their original's and are not in the figures"
        )
    faceless = quality.get("photos_without_face")
    if faceless:
        lines.append(
            f"{faceless} protected photo(s) had no face found by the protection: left as they were, "
            "unprotected in the scraper's gallery"
        )
    return lines


def _cloak_check(quality: dict) -> str:
    """How many cloaked faces passed the cloak's own check, and how many only one level up."""
    line = (
        f"{quality.get('cloak_faces_protected')} of {quality.get('cloak_faces')} faces passed the "
        "cloak's own JPEG-75 check"
    )
    if quality.get("cloak_faces_escalated"):
        line += f", {quality['cloak_faces_escalated']} of them cloaked again one level up (--escalate)"
    return line


def _replaced_redetection(realism: dict) -> str:
    """The re-detection of replaced subjects alone, where faces were replaced; else nothing."""
    if "redetected_replaced" not in realism:
        return ""
    return f" (replaced subjects: {realism['redetected_replaced']:.3f} of {realism['replaced_subjects']})"


def _realism_lines(quality: dict) -> list[str]:
    """Realism beside protection (re-detection, confidence, detail) and the replacement's checks."""
    lines = []
    realism = quality.get("realism")
    if realism:
        lines.append(
            f"realism (subject face, after JPEG 75): re-detected {realism['redetected']:.3f}"
            + _replaced_redetection(realism)
            + ", "
            f"detector confidence {realism['score_protected']:.3f} "
            f"(original {realism['score_original']:.3f}), "
            f"face detail {realism['detail_protected']:.2f} (original {realism['detail_original']:.2f})"
        )
    replace = quality.get("replace")
    if replace:
        matches = ", ".join(
            f"{name} {share:.3f}" for name, share in replace["subjects_matching_a_donor"].items()
        )
        lines.append(
            f"replace: {replace['protected']} of {replace['faces']} faces passed every check "
            f"({replace.get('finished', 0)} finished with a faint cloak, "
            f"{replace.get('finished_at_mid', 0)} of them at mid); "
            f"{replace.get('blurred_after_failed_tries', 0)} blurred after failed tries, "
            f"{replace['blurred_small']} too small (blurred), "
            f"{replace.get('not_protected', 0)} NOT protected; "
            f"{replace['attempts_mean']:.2f} tries per face; "
            f"subjects matching a donor used: {matches or '-'}"
        )
        for photo, distances in replace.get("photos_matching_a_donor", {}).items():
            near = ", ".join(f"{name} at {ratio:.3f}x its threshold" for name, ratio in distances.items())
            lines.append(f"  matches a donor: {photo} ({near})")
    return lines


def _examples_section(examples: list[dict], at_level: str = "") -> list[str]:
    if not examples:
        return []
    parts = [
        f"<h2>Examples{html.escape(at_level)}</h2>"
        f"<p class='note'>original, protected, |difference| x{DIFFERENCE_GAIN:g}</p>"
    ]
    for example in examples:
        original, protected = example["original"], example["protected"]
        images = [to_uint8(original), to_uint8(protected)]
        if original.shape == protected.shape:
            images.append(to_uint8(((protected - original).abs() * DIFFERENCE_GAIN).clamp(0, 1)))
        tags = "".join(f"<img src='data:image/png;base64,{_png(array)}'>" for array in images)
        title = f"{html.escape(example['person'])} / {html.escape(example['photo'])}"
        parts.append(f"<div class='pair'><p>{title}</p>{tags}</div>")
    return parts


def _summary_line(result: EvaluationResult) -> str:
    at_level = _quality_level(result)
    return "; ".join(
        f"{row.attacker} after {row.upload}{at_level}: protection {_fmt(row.protection)} "
        f"(control rank-1 {_fmt(row.control_rank1)})"
        for row in result.rows
        if row.upload in ("jpeg75", "none")
        and not row.adaptive
        and (row.level or "-") in ("-", result.settings.get("level"))
    )


TEXT_COLUMNS = [
    ("attacker", "attacker", 16),
    ("level", "level", 7),
    ("upload", "upload", 13),
    ("adaptive", "adaptive", 9),
    ("protection", "protection", 11),
    ("protected_rank1", "rank1 prot", 11),
    ("control_rank1", "rank1 ctrl", 11),
    ("tar_at_far_1e3", "TAR@1e-3", 10),
    ("protected_probes_found", "found prot", 11),
    ("control_probes_found", "found ctrl", 11),
]


def summary_table(result: EvaluationResult) -> str:
    """A plain-text table of the rows, for the terminal."""
    lines = ["".join(f"{title:<{width}}" for _, title, width in TEXT_COLUMNS)]
    lines.append("-" * len(lines[0]))
    for row in result.rows:
        cells = [_cell(row, name) for name, _, _ in TEXT_COLUMNS]
        lines.append("".join(f"{_fmt(cell):<{width}}" for cell, (_, _, width) in zip(cells, TEXT_COLUMNS)))
    lines += _missed_probe_notes(result.rows)
    lines += _leave_one_out_lines(result.settings.get("leave_one_out") or [])
    lines += [  # an attacker with no fine-tuned rows, and why: in the report files alone before
        f"note: {name} {why}"
        for name, why in (result.settings.get("finetune") or {}).items()
        if isinstance(why, str)
    ]
    lines += [f"upload {name}: {description}" for name, description in _upload_descriptions(result).items()]
    quality = result.quality
    at_level = _quality_level(result)
    if quality.get("dssim") and quality.get("photos") == 0:
        # no photo was compared (each protected one has another size): it read "PSNR infinite (no
        # photo changed)" of photos that were all changed
        lines.append(
            f"quality{at_level} (whole photo): not measured, no protected photo has its original's size"
        )
    elif quality.get("dssim"):
        lines.append(
            f"quality{at_level} (whole photo): DSSIM mean {quality['dssim']['mean']:.4f}, "
            f"{_psnr_text(quality)}, L-inf max {quality['linf']['max']:.0f}/255"
        )
    if "face_dssim" in quality:
        face = quality["face_dssim"]
        lines.append(
            f"face DSSIM{at_level}: mean {face['mean']:.4f} (max {face['max']:.4f}); {_cloak_check(quality)}"
        )
    lines += _photo_notes(quality)
    lines += _level_sweep_lines(result)
    lines += _realism_lines(quality)
    lines.append(f"timings{at_level}: {result.timings}")
    return "\n".join(lines)


def _leave_one_out_lines(rows: list[dict]) -> list[str]:
    """The leave-one-out rows (`--leave-one-out`) as the HTML report has them.

    The figure that option is run for was in the report files alone, never on the terminal.
    """
    if not rows:
        return []
    lines = ["leave-one-out: cloaked without the model, measured on it"]
    for row in rows:
        lines.append(
            f"  {row.get('left_out')} left out (cloaked with {row.get('cloaked_with')}), "
            f"upload {row.get('upload')}: "
            f"protection {_fmt(row.get('protection'))}, control rank-1 {_fmt(row.get('control_rank1'))}"
        )
    return lines


def _missed_probe_notes(rows: list[EvaluationRow]) -> list[str]:
    """A note per attacker whose own detector missed protected probes: each counts as a miss.

    Without it, protection the attacker's detector gives (dlib's HOG misses some clean faces)
    read as protection the method gives.
    """
    notes = {}
    for row in rows:
        if row.protected_probes_found is not None and row.protected_probes_found < row.protected_probes:
            missed = row.protected_probes - row.protected_probes_found
            notes.setdefault(
                row.attacker,
                f"note: {row.attacker} found no face in {missed} of the {row.protected_probes} protected "
                "people's clean probes; each counts as a miss, so that much of its protection comes from "
                "its own detector, not from the protection",
            )
    return list(notes.values())


def _upload_descriptions(result: EvaluationResult) -> dict[str, str]:
    """What each upload of the rows did (a report from before they were recorded: looked up)."""
    recorded = result.settings.get("upload_transforms") or {}
    uploads = dict.fromkeys(row.upload for row in result.rows)
    return {name: recorded.get(name) or UPLOAD_DESCRIPTIONS.get(name, "?") for name in uploads}


def _quality_level(result: EvaluationResult) -> str:
    """``" at level mid"`` where the rows span levels (``--level all``): the quality is that level's."""
    levels = {row.level for row in result.rows if row.level not in (None, "-")}
    level = result.settings.get("level")
    return f" at level {level}" if len(levels) > 1 and level else ""


def _level_sweep_lines(result: EvaluationResult) -> list[str]:
    """Each level's face DSSIM and check after a level sweep, beside the one level the lines above give."""
    sweep = result.settings.get("level_sweep") or []
    if not sweep:
        return []

    def figures(level: dict) -> str:
        dssim = level.get("dssim")
        text = f"face DSSIM mean {dssim:.4f}" if dssim is not None and math.isfinite(dssim) else "no DSSIM"
        if level.get("cloak_faces") is not None:
            text += (
                f" ({level.get('cloak_faces_protected')} of {level['cloak_faces']} faces passed the check)"
            )
        return text

    return ["by level: " + "; ".join(f"{level['level']}: {figures(level)}" for level in sweep)]


def _psnr_text(quality: dict) -> str:
    """The PSNR mean, over the photos the protection changed (an unchanged one's is infinite)."""
    values = quality.get("per_photo", {}).get("psnr", [])
    unchanged = sum(1 for value in values if value is None or not math.isfinite(value))
    mean = quality["psnr"]["mean"]
    if mean is None or not math.isfinite(mean):
        return "PSNR infinite (no photo changed)"
    if unchanged:
        return f"PSNR mean {mean:.1f} dB over the changed photos ({unchanged} of {len(values)} unchanged)"
    return f"PSNR mean {mean:.1f} dB"
