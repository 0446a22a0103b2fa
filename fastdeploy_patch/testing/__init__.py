"""The multi-rank harness: ``launcher`` starts N real Paddle ranks as subprocesses and never leaves one behind,
``rank_entry`` is what each of those ranks runs, and ``gpu_profile`` reads a Paddle profile for device events.
``rank_pool`` keeps ranks alive across calls (each runs ``pool_rank``, which puts back after every call the state
``rank_state`` recorded when the rank joined), ``pickles`` is how values cross, ``plugin`` is its pytest side (the
``paddle_ranks`` fixture), and ``rank_calls`` holds what a rank function may call about its own call
(``exit_after_reply``, ``keep_open``, exported here).

This is a tool beside the patch, not part of it: the ``fastdeploy-patch`` command (``cli/``) and tests import it.
It may import the patch, and takes signal-group names only from ``fastdeploy_patch.signal_group``, never from that
package's internal modules; the patch never imports anything from here. Importing it imports no Paddle.
"""

from fastdeploy_patch.testing.rank_calls import exit_after_reply, keep_open

__all__ = ["exit_after_reply", "keep_open"]
