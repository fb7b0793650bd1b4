"""The report's HTML page: sections built from what :mod:`.gather` and :mod:`.drawing` make,
the style sheet and script from ``assets/`` (package data), and :func:`write_report`.

One self-contained file (images as base64 JPEG, histograms as inline SVG, no external resource:
it opens offline and can be mailed). A section that cannot be built says why in the page.
"""

from __future__ import annotations

import functools
import html
import logging
import math
import time
from importlib import resources
from typing import Any

from ..io.location import Location, is_remote
from ..output.atomic import write_bytes_atomic
from ..output.folder import IMAGES, MASKS, NUCLEI, RUN, OutputFolder
from ..output.reader import open_masks, read_images_with_records, read_run, sample_nuclei
from ..output.tables import check_segment_output
from .drawing import format_number, histogram_svg
from .gather import (
    DISPLAY_SIDE,
    MAX_HISTOGRAM_ROWS,
    NUCLEI_COLUMNS_USED,
    THUMB_SIDE,
    ImageViews,
    render_image,
    sample_ids,
)

log = logging.getLogger(__name__)

GALLERY_SIZE = 12
EXTREMES = 3  # images with the fewest / the most nuclei
MAX_FAILED_ROWS = 200


@functools.cache
def asset(name: str) -> str:
    """A file of ``nucleibatch/report/assets/`` (package data) as text: ``report.css``, the page's
    style, or ``report.js``, which records script errors and failed image loads, and once loaded
    how many images decoded, on ``<body data-...>`` (a headless browser, in the tests, reads them
    from the DOM; a person never sees them)."""
    return (resources.files(__package__) / "assets" / name).read_text(encoding="utf-8")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt_seconds(seconds: Any) -> str:
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _guarded(anchor: str, title: str, build, *args) -> str:
    """A section, or a note saying why it could not be built (the report is still written)."""
    try:
        return _section(anchor, title, build(*args))
    except Exception as error:
        log.warning("report: section %r failed: %s", title, error, exc_info=True)
        return _section(anchor, title, f'<p class="bad">this section could not be built: {_e(type(error).__name__)}: {_e(error)}</p>')


def _summary_html(out: Location, run: dict[str, Any], images) -> str:
    n_ok = int((images["status"] == "ok").sum())
    n_failed = len(images) - n_ok
    n_nuclei = int(images.loc[images["status"] == "ok", "n_nuclei"].sum())
    model = run.get("model") or {}
    sha = str(model.get("sha256") or "")
    cards = [
        ("images", f"{len(images):,}"),
        ("ok", f'<span class="ok">{n_ok:,}</span>'),
        ("failed", f'<span class="{"bad" if n_failed else "ok"}">{n_failed:,}</span>'),
        ("nuclei", f"{n_nuclei:,}"),
        ("wall time", _fmt_seconds(run.get("wall_seconds"))),
        ("MPix/s", format_number(run["mpix_per_s"]) if isinstance(run.get("mpix_per_s"), (int, float)) else "–"),
    ]
    body = ['<div class="cards" id="summary-cards">']
    for name, value in cards:
        body.append(f'<div class="card" data-name="{_e(name)}"><b>{value}</b>{_e(name)}</div>')
    body.append("</div>")
    settings = run.get("settings") or {}
    megapixels = float((images.loc[images["status"] == "ok", "height"] * images.loc[images["status"] == "ok", "width"]).sum()) / 1e6
    rows = [
        ("output", _e(out if is_remote(out) else out.resolve())),
        ("model", f"{_e(model.get('name') or '–')} <code>sha256 {_e(sha[:12]) or '–'}</code>"),
        *(
            (f"model {_e(entry.get('name'))}", f"{_e(', '.join(entry.get('serves') or []) or 'every image')}: {int(entry.get('images') or 0):,} images <code>sha256 {_e(str(entry.get('sha256') or '')[:12])}</code>")
            for entry in (run.get("models") or [])
            if len(run.get("models") or []) > 1
        ),
        ("engine / device", f"{_e(run.get('engine') or '–')} / {_e(run.get('device') or '–')}"),
        ("started", _e(run.get("started") or "–")),
        ("megapixels (ok images)", f"{megapixels:,.2f}"),
        ("nucleibatch", _e(run.get("nucleibatch_version") or "–")),
        ("settings", _e(", ".join(f"{k}={v}" for k, v in settings.items())) or "–"),
        ("inputs", _e(" ".join(str(i) for i in run.get("inputs") or [])) or "–"),
    ]
    if not run:
        rows.insert(0, (RUN, '<span class="bad">missing or unreadable: the run may still be going or was stopped</span>'))
    counts = run.get("counts") or {}
    if counts and (counts.get("images"), counts.get("ok")) != (len(images), n_ok):
        rows.append(("note", _e(f"{RUN} counts the last run's inputs ({counts.get('ok')} ok of {counts.get('images')}); this report counts every image in OUT")))
    body.append('<table class="kv">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>")
    stages = run.get("stage_seconds") or {}
    if stages:
        total = sum(float(v) for v in stages.values() if isinstance(v, (int, float))) or 1.0
        cells = "".join(
            f'<tr><td>{_e(k)}</td><td class="num">{float(v):.2f} s</td><td><svg width="200" height="10"><rect width="{200 * float(v) / total:.1f}" height="10" fill="#3b6fb6"/></svg></td></tr>'
            for k, v in stages.items()
            if isinstance(v, (int, float))
        )
        note = _e(run.get("stage_seconds_note") or "")
        body.append(f"<details><summary>seconds per stage</summary><table>{cells}</table><p class=\"muted\">{note}</p></details>")
    return "".join(body)


def _figure(views: ImageViews, title: str, extra: str = "", thumb: bool = False) -> str:
    label = _e(title)
    if not views.views:
        return f'<figure class="missing"><figcaption><b>{label}</b> {_e(extra)}<br><span class="bad">{_e(views.note or "no picture")}</span></figcaption></figure>'
    images = "".join(
        f'<img src="{v.url}" alt="{_e(views.image_id)}" title="{_e(v.caption)}" width="{v.width}" height="{v.height}"'
        + (' class="px"' if v.width < 360 and not thumb else "")
        + (f' data-crop="{",".join(str(c) for c in v.box)}"' if v.box else "") + ">"
        for v in views.views
    )
    wide = ""
    if len(views.views) > 1:
        images = f'<div class="pair">{images}</div>'
        wide = ' class="wide"'
    captions = "" if thumb else "<br>" + " | ".join(_e(v.caption) for v in views.views)
    note = f'<br><span class="muted">{_e(views.note)}</span>' if views.note else ""
    return f'<figure{wide} data-image-id="{_e(views.image_id)}">{images}<figcaption><b>{label}</b> {_e(extra)}{captions}{note}</figcaption></figure>'


def _render_safely(root, out, row, channel, store_image, max_side, crop) -> ImageViews:
    try:
        return render_image(root, out, row, channel, store_image, max_side, crop)
    except Exception as error:
        log.warning("report: cannot draw %s: %s", row.get("image_id"), error, exc_info=True)
        return ImageViews(str(row.get("image_id")), note=f"cannot draw: {type(error).__name__}: {error}")


def _gallery_html(out: Location, run: dict[str, Any], images, root) -> str:
    ok = images[images["status"] == "ok"]
    if ok.empty:
        return "<p>no image was segmented.</p>"
    settings = run.get("settings") or {}
    channel, store_image = settings.get("channel"), settings.get("store_image", True) is not False
    chosen = sample_ids(ok["image_id"], GALLERY_SIZE)
    by_id = ok.set_index("image_id", drop=False)
    figures = []
    for image_id in chosen:
        row = by_id.loc[image_id].to_dict()
        views = _render_safely(root, out, row, channel, store_image, DISPLAY_SIDE, True)
        figures.append(_figure(views, image_id, f"— {int(row['n_nuclei']):,} nuclei"))
    intro = f'<p class="muted">{len(chosen)} of {len(ok):,} segmented images (picked by a hash of image_id), nucleus outlines in green'
    intro += "; large images: a downsampled whole view (the magenta box is the crop) and a full-resolution crop of the densest area.</p>"
    return intro + f'<div class="gallery">{"".join(figures)}</div>'


def _extremes_html(out: Location, run: dict[str, Any], images, root) -> str:
    ok = images[images["status"] == "ok"].sort_values(["n_nuclei", "image_id"], kind="stable")
    if ok.empty:
        return "<p>no image was segmented.</p>"
    settings = run.get("settings") or {}
    channel, store_image = settings.get("channel"), settings.get("store_image", True) is not False
    parts = []
    for title, rows in (("fewest nuclei", ok.head(EXTREMES)), ("most nuclei", ok.tail(EXTREMES).iloc[::-1])):
        figures = []
        for row in rows.to_dict("records"):
            views = _render_safely(root, out, row, channel, store_image, THUMB_SIDE, False)
            extra = f"{int(row['n_nuclei']):,} nuclei, {int(row['height'] or 0)}x{int(row['width'] or 0)}"
            figures.append(_figure(views, str(row["image_id"]), extra, thumb=True))
        parts.append(f'<h3>{_e(title)}</h3><div class="thumbs" data-kind="{_e(title)}">{"".join(figures)}</div>')
    return "".join(parts)


def _histograms_html(out: Location, images) -> str:
    data, total, problems = sample_nuclei(out, NUCLEI_COLUMNS_USED, MAX_HISTOGRAM_ROWS)
    ok = images[images["status"] == "ok"]
    charts = [
        histogram_svg(data["area"], "area (px)", clip_percentiles=(0.5, 99.5)),
        histogram_svg(data["mean_intensity"], "mean intensity", clip_percentiles=(0.5, 99.5)),
        histogram_svg(data["eccentricity"], "eccentricity", value_range=(0.0, 1.0)),
        histogram_svg(ok["n_nuclei"].to_numpy(), "nuclei per image", integer=True),
    ]
    shown = len(data["area"])
    note = f"{total:,} nuclei in {NUCLEI}" + (f"; every {math.ceil(total / shown)}th of them shown ({shown:,})" if total > shown > 0 else "")
    note += "; area and intensity axes cut at the 0.5 and 99.5th percentiles."
    if problems:
        note += " Unreadable parts skipped: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    return f'<div class="hists">{"".join(charts)}</div><p class="muted">{_e(note)}</p>'


def _failed_html(images) -> str:
    failed = images[images["status"] != "ok"]
    if failed.empty:
        return '<p class="ok" id="no-failed">every image was segmented.</p>'
    reasons: dict[str, int] = {}
    for row in failed.to_dict("records"):
        reason = str(row.get("error") or "no reason recorded")
        for name in (row.get("source"), row.get("image_id")):
            if name:
                reason = reason.replace(str(name), "…")
        reasons[reason] = reasons.get(reason, 0) + 1
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    body = [f'<p class="bad">{len(failed):,} image(s) failed. Most frequent reasons:</p><table><tr><th>images</th><th>reason</th></tr>']
    body += [f'<tr><td class="num">{n}</td><td>{_e(r)}</td></tr>' for r, n in top]
    body.append('</table><p></p><table id="failed-table"><tr><th>image_id</th><th>source</th><th>error</th></tr>')
    for row in failed.head(MAX_FAILED_ROWS).to_dict("records"):
        body.append(f"<tr><td>{_e(row['image_id'])}</td><td>{_e(row.get('source'))}</td><td>{_e(row.get('error') or 'no reason recorded')}</td></tr>")
    body.append("</table>")
    if len(failed) > MAX_FAILED_ROWS:
        body.append(f'<p class="muted">first {MAX_FAILED_ROWS} of {len(failed):,}: all are in {IMAGES} (status = \'failed\').</p>')
    body.append('<p class="muted">Fix the inputs (or the settings the reasons name), then re-run the same command with --retry-failed.</p>')
    return "".join(body)


def build_report_html(out_dir: str | Location) -> str:
    """The report of a segment output as an HTML string (see :func:`write_report`)."""
    started = time.perf_counter()
    out = check_segment_output(out_dir)
    run = read_run(out) or {}
    images = read_images_with_records(out)
    try:
        root = open_masks(out)
        store_problem = None
    except Exception as error:
        root, store_problem = None, f"{type(error).__name__}: {error}"

    def need_store(build):
        def wrapped(*args):
            if root is None:
                return f'<p class="bad">{MASKS} cannot be opened: {_e(store_problem)}</p>'
            return build(*args, root)

        return wrapped

    sections = [
        _guarded("summary", "Run summary", _summary_html, out, run, images),
        _guarded("gallery", "Gallery", need_store(_gallery_html), out, run, images),
        _guarded("extremes", "Fewest and most nuclei", need_store(_extremes_html), out, run, images),
        _guarded("histograms", "Nucleus measurements", _histograms_html, out, images),
        _guarded("failed", "Failed images", _failed_html, images),
    ]
    made = time.strftime("%Y-%m-%d %H:%M:%S %z")
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (("summary", "summary"), ("gallery", "gallery"), ("extremes", "fewest / most"), ("histograms", "measurements"), ("failed", "failed")))
    footer = f'<p class="muted">made by nucleibatch report from {_e(out if is_remote(out) else out.resolve())} at {_e(made)} in {time.perf_counter() - started:.1f} s; rebuild with <code>nucleibatch report {_e(out)}</code>.</p>'
    # the style sheet and the script each start on a line of their own, as in pages of earlier versions
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>nucleibatch report: {_e((out if is_remote(out) else out.resolve()).name)}</title><style>\n{asset('report.css')}</style><script>\n{asset('report.js')}</script></head>"
        f'<body><h1>Nuclei segmentation report</h1><nav>{nav}</nav>{"".join(sections)}{footer}</body></html>\n'
    )


def write_report(out_dir: str | Location) -> Location:
    """Write ``OUT/report.html``: a self-contained QC report of a segment output, from OUT alone.

    Safe to call at the end of every run and on partial outputs (a run still going or killed):
    missing or damaged parts are reported in the page, not raised. Reads at most one pyramid
    level <= 1024 px and one 512 px crop per shown image and streams the nuclei table, so it
    takes seconds and bounded memory whatever the size of the run.

    Args:
        out_dir: the ``-o`` folder of ``nucleibatch segment``.

    Returns:
        The path of ``report.html`` (written atomically).

    Raises:
        NotSegmentOutputError: ``out_dir`` is not a segment output (exit status 2 on the CLI).
    """
    out = check_segment_output(out_dir)
    page = build_report_html(out)
    path = OutputFolder(out).report
    write_bytes_atomic(path, page.encode("utf-8"))  # a reader never sees half a report
    return path
