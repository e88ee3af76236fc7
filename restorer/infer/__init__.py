"""Inference: the tiled engine and the three commands built on it.

* ``engine``   -- :class:`~restorer.infer.engine.Restorer` (tiled inference equal to whole-image
  inference), loading weights (packaged names, files, folders), choosing among them by quality.
* ``options``  -- the options ``restore``, ``eval`` and ``compare`` share (dataclasses of
  :mod:`restorer.config` that each command's options class inherits), and their common setup.
* ``restore``  -- ``restorer restore``: photos in, restored images out, inputs never touched.
* ``evaluate`` -- ``restorer eval``: PSNR / SSIM / PSNR-B of JPEG vs restored on references.
* ``compare``  -- ``restorer compare``: a JPEG | restored | original panel.
"""
