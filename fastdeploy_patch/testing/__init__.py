"""The multi-rank harness. ``rank_processes`` is the one way rank processes are started (``start_rank``: spawned, or
forked from this process's ``warm_parent``, which imported Paddle once), waited for, killed and reported on (one
failure format); ``rank_world`` gives them ports and the environment Paddle reads to join
a world (CPU and gloo, or GPU and NCCL). Two uses of it: ``launcher`` starts N fresh ranks that each run
``rank_entry`` and write a JSON result (the ``fastdeploy-patch`` command's ranks, ranks placed on other "hosts"); the
rank pool runs calls on fresh worlds or, on request, on ranks kept alive across calls (``rank_pool``: a session's
pools; ``pool_world``: one world; each rank
runs ``pool_rank``, which puts back after every call the state ``rank_state`` recorded when the rank joined;
``call_target`` is what a call names, ``pickles`` how values cross). ``plugin`` is what the ``paddle_ranks`` fixture
gives a test, ``leak_guard`` the plugin's check for leftover processes and segments (the pytest hooks live in the
top-level ``pytest_paddle_ranks``, which loads without Paddle), ``rank_calls`` what a rank function may call about
its own call (``exit_after_reply``, ``keep_open``, exported here), and ``gpu_profile`` reads a Paddle profile for
device events.

This is a tool beside the patch, not part of it: the ``fastdeploy-patch`` command (``cli/``) and tests import it.
It may import the patch, and takes signal-group names only from ``fastdeploy_patch.signal_group``, never from that
package's internal modules; the patch never imports anything from here. Importing it imports no Paddle.
"""

from fastdeploy_patch.testing.rank_calls import exit_after_reply, keep_open

__all__ = ["exit_after_reply", "keep_open"]
