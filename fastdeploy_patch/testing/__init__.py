"""The multi-rank harness: ``launcher`` starts N real Paddle ranks as subprocesses and never leaves one behind,
``rank_entry`` is what each of those ranks runs, and ``gpu_profile`` reads a Paddle profile for device events.

This is a tool beside the patch, not part of it: the ``fastdeploy-patch`` command (``cli/``) and tests import it.
It may import the patch, and takes signal-group names only from ``fastdeploy_patch.signal_group``, never from that
package's internal modules; the patch never imports anything from here.
"""
