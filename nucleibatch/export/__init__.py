"""`nucleibatch export`: a finished `segment` output folder -> files other tools read.

Formats (one call exports the images of OUT whose status is 'ok'; failed ones are skipped
and named in the summary):

* ``geojson`` — ``DIR/<name>.geojson`` per image, a QuPath-compatible FeatureCollection with
  one detection Feature per nucleus (classification "Nucleus", the nuclei.parquet
  measurements, ``label`` and ``image_id``); outlines as :mod:`.outlines` describes.
* ``dsb-rle`` — ``DIR/submission.csv``, the Data Science Bowl 2018 submission format
  (``ImageId,EncodedPixels``; one row per nucleus; an image without nuclei gets one row
  with empty EncodedPixels).
* ``png`` — ``DIR/<name>.png`` 16-bit greyscale label image (refused when a label > 65535).
* ``tiff`` — ``DIR/<name>.tif`` 32-bit label image, zlib-compressed, tiled like the zarr chunks.

``<name>`` is :func:`nucleibatch.output.store.store_name` of the image id (the image's zarr group name,
``store_path``, except for plate fields, whose groups are nested in their plate): file-system
safe, flat, stable, unique.

Memory
    The label image is never loaded whole for GeoJSON and RLE (:mod:`.chunks` reads it chunk by
    chunk). TIFF is written tile by tile (tiles = zarr chunks); PNG is streamed row band by row
    band (:mod:`.png`), so its peak memory is one row of chunks.

Modules: the pure array functions in :mod:`.rle` and :mod:`.outlines`, the chunked label reads
in :mod:`.chunks`, the PNG encoder in :mod:`.png`, the other per-format writers in
:mod:`.writers`, and the job that the CLI (:mod:`nucleibatch.cli.export`) runs in :mod:`.job`.
"""

from .job import FORMATS, ExportSummary, export_run, failed_line

__all__ = ["FORMATS", "ExportSummary", "export_run", "failed_line"]
