"""The developer commands beside the suites: `tox -e mutation` (tests/mutation.py) and `tox -e stress`
(tests/stress.py)."""

from __future__ import annotations

from pathlib import Path

from tests import mutation, stress


def test_a_module_path_becomes_the_pattern_of_its_mutants() -> None:
    assert mutation.module_glob("fastdeploy_patch/signal_group/futex.py") == "fastdeploy_patch.signal_group.futex.*"
    assert mutation.module_glob("fastdeploy_patch/status.py") == "fastdeploy_patch.status.*"


def test_a_mutated_function_is_counted_under_the_longest_module_named() -> None:
    modules = ["fastdeploy_patch.signal_group", "fastdeploy_patch.signal_group.futex"]
    assert mutation.module_of("fastdeploy_patch.signal_group.futex.xǁFutexǁwake", modules) == modules[1]
    assert mutation.module_of("fastdeploy_patch.signal_group.x_new_signal_group", modules) == modules[0]
    # With no module named (the whole package), the function's own module.
    assert (
        mutation.module_of("fastdeploy_patch.testing.rank_pool.x_free_ports", [])
        == "fastdeploy_patch.testing.rank_pool"
    )


def test_a_result_line_names_the_function_and_the_status() -> None:
    found = mutation.RESULT.match("    fastdeploy_patch.signal_group.futex.x_probe__mutmut_29: survived")
    assert (found["name"], found["status"]) == ("fastdeploy_patch.signal_group.futex.x_probe", "survived")
    assert mutation.RESULT.match("fastdeploy_patch.signal_group.futex.x_probe: survived") is None


def test_stress_shuffles_every_test_file_the_same_way_for_a_seed(tmp_path: Path, monkeypatch) -> None:
    for name in ("a/test_one.py", "a/test_two.py", "a/helper.py", "b/test_three.py", "b/deep/test_four.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    monkeypatch.chdir(tmp_path)
    every = ["a/test_one.py", "a/test_two.py", "b/deep/test_four.py", "b/test_three.py"]
    orders = {tuple(stress.shuffled_files(["a", "b"], seed)) for seed in range(20)}
    assert all(sorted(order) == every for order in orders)
    assert len(orders) > 1
    assert stress.shuffled_files(["a", "b"], 7) == stress.shuffled_files(["a", "b"], 7)
