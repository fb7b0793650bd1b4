"""QC report of a segment output: ``OUT/report.html``, built from OUT alone.

One self-contained HTML file (images as base64 JPEG, histograms as inline SVG, no external
resource: it opens offline and can be mailed) with

* the run summary: images ok / failed, nuclei, wall time, MPix/s, model, engine, device, date;
* a gallery of nucleus outlines drawn on up to :data:`~.html.GALLERY_SIZE` images picked
  deterministically (by a hash of ``image_id``, so a resumed run shows the same ones); an image
  larger than :data:`~.gather.OVERVIEW_SIDE` is shown as its lowest pyramid level that fits plus
  a full-resolution crop of :data:`~.gather.CROP_SIDE` px around its densest area;
* the images with the fewest and the most nuclei (thumbnails);
* histograms of area, mean intensity and eccentricity (at most
  :data:`~.gather.MAX_HISTOGRAM_ROWS` nuclei, an even stride over ``nuclei.parquet``) and of
  nuclei per image;
* the failed images with their reasons.

Cost does not grow with the images' size (only one pyramid level <= 1024 px and one crop are
read per shown image) nor much with their number (a few dozen images are read; the tables are
streamed). :func:`write_report` raises only when OUT is not a segment output
(:class:`~nucleibatch.errors.NotSegmentOutputError`); a section whose data is missing or damaged
says so in the report instead.

Modules: :mod:`.drawing` (pure: arrays in, arrays or text out), :mod:`.gather` (what the page
shows of OUT, read through :mod:`nucleibatch.output.reader`), :mod:`.html` (the page, with
``assets/report.css`` and ``assets/report.js``).
"""

from .html import build_report_html, write_report

__all__ = ["build_report_html", "write_report"]
