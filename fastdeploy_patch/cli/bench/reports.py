"""What each benchmark's ranks return, turned into its report: a JSON-ready dict (``--json``), a table for people,
and for the latency and jitter benchmarks a plot of the distributions (``--plot``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fastdeploy_patch.cli.bench import jitter, late_src, latency

RATIOS = {
    "legacy_over_gloo": ("legacy", "gloo"),
    "gloo_over_shm": ("gloo", "shm"),
    "legacy_over_shm": ("legacy", "shm"),
}
"""The ratios the latency report gives, as (numerator path, denominator path)."""


# --- statistics --------------------------------------------------------------------------------------------------


def percentile_us(samples_ns: Sequence[int], q: float) -> float:
    """The ``q``-th percentile (linear interpolation) of ``samples_ns``, in microseconds; 0.0 when empty."""
    if not len(samples_ns):
        return 0.0
    return float(np.percentile(samples_ns, q)) / 1000.0


def mean_us(samples_ns: Sequence[int]) -> float:
    """The mean of ``samples_ns`` in microseconds; 0.0 when empty."""
    return float(np.mean(samples_ns)) / 1000.0 if len(samples_ns) else 0.0


def summarize(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99 and mean of ``samples_ns`` in microseconds, and the sample count."""
    return {
        "p50_us": percentile_us(samples_ns, 50),
        "p99_us": percentile_us(samples_ns, 99),
        "mean_us": mean_us(samples_ns),
        "samples": len(samples_ns),
    }


def pooled(results: Sequence[dict], order: Iterable[str]) -> dict[str, list[int]]:
    """Every rank's samples of each path in one list, paths in ``order`` (those the ranks measured)."""
    names = [name for name in order if name in results[0]["samples_ns"]]
    return {name: [ns for r in results for ns in r["samples_ns"][name]] for name in names}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _paths(results: Sequence[dict], labels: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "label": labels[name],
            **summarize(values),
            "per_rank": {str(r["rank"]): summarize(r["samples_ns"][name]) for r in results},
        }
        for name, values in pooled(results, labels).items()
    }


def _table(
    paths: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, Callable[[Mapping], str]]]
) -> list[str]:
    width = max(len(p["label"]) for p in paths.values())
    lines = ["  ".join(["path".ljust(width), *(f"{title:>9}" for title, _ in columns)])]
    for p in paths.values():
        lines.append("  ".join([p["label"].ljust(width), *(f"{cell(p):>9}" for _, cell in columns)]))
    return lines


# --- latency -----------------------------------------------------------------------------------------------------


def build_latency_report(
    results: Sequence[dict], *, nranks: int, iters: int, warmup: int, backend: str, paddle_version: str
) -> dict[str, Any]:
    """The latency benchmark's figures: each path's p50/p99/mean over all ranks' samples (and per rank), the
    ratios legacy/gloo, gloo/shm and legacy/shm at p50 and at the mean, and what the deadline thread adds."""
    paths = _paths(results, latency.LABELS)
    return {
        "mode": "latency",
        "nranks": nranks,
        "iters": iters,
        "warmup": warmup,
        "backend": backend,
        "paddle_version": paddle_version,
        "paths": paths,
        "ratios": {
            name: {
                "p50": _ratio(paths[top]["p50_us"], paths[bottom]["p50_us"]),
                "mean": _ratio(paths[top]["mean_us"], paths[bottom]["mean_us"]),
            }
            for name, (top, bottom) in RATIOS.items()
        },
        "deadline_thread_cost_us": {
            "p50": paths["gloo_deadline"]["p50_us"] - paths["gloo"]["p50_us"],
            "mean": paths["gloo_deadline"]["mean_us"] - paths["gloo"]["mean_us"],
        },
    }


_LATENCY_COLUMNS = (
    ("p50 us", lambda p: f"{p['p50_us']:.1f}"),
    ("p99 us", lambda p: f"{p['p99_us']:.1f}"),
    ("mean us", lambda p: f"{p['mean_us']:.1f}"),
)


def format_latency_report(report: Mapping[str, Any]) -> str:
    """The human-readable latency table, the ratios, and the deadline thread's cost."""
    lines = [
        f"signal sync per step, {report['nranks']} ranks ({report['backend']}), {report['iters']} steps after "
        f"{report['warmup']} warm-up, Paddle {report['paddle_version']}; all ranks' samples pooled",
        *_table(report["paths"], _LATENCY_COLUMNS),
    ]
    for name, ratio in report["ratios"].items():
        top, bottom = RATIOS[name]
        lines.append(f"{top} / {bottom}: {_times(ratio['p50'])} at p50, {_times(ratio['mean'])} at the mean")
    deadline = report["deadline_thread_cost_us"]
    lines.append(
        f"deadline thread cost: {deadline['p50']:+.1f} us per step at p50, {deadline['mean']:+.1f} us at the mean"
    )
    return "\n".join(lines)


# --- jitter ------------------------------------------------------------------------------------------------------


def _percent_over(value: float, base: float) -> float | None:
    return (value - base) / base * 100.0 if base else None


def build_jitter_report(
    results: Sequence[dict], *, nranks: int, iters: int, warmup: int, paddle_version: str
) -> dict[str, Any]:
    """The jitter benchmark's figures: each path's loop time per step (the mean; p50/p99 too) over all ranks,
    its overhead over no sync in percent, and the lookahead path's overhead as a fraction of lockstep shm's."""
    paths = _paths(results, jitter.LABELS)
    base = paths["nosync"]["mean_us"]
    for path in paths.values():
        path["overhead_pct"] = _percent_over(path["mean_us"], base)
    lockstep, pipelined = paths["shm"]["overhead_pct"], paths["shm_lookahead"]["overhead_pct"]
    return {
        "mode": "jitter",
        "nranks": nranks,
        "iters": iters,
        "warmup": warmup,
        "paddle_version": paddle_version,
        "work_us": list(jitter.WORK_US),
        "work_us_mean": float(np.mean([r["work_us_mean"] for r in results])),
        "seed": jitter.SEED,
        "lookahead": jitter.LOOKAHEAD,
        "paths": paths,
        # Only meaningful when lockstep costs something: a zero or negative overhead leaves nothing to compare.
        "lookahead_over_lockstep_shm": pipelined / lockstep if lockstep is not None and lockstep > 0 else None,
    }


def _overhead(path: Mapping[str, Any]) -> str:
    pct = path["overhead_pct"]
    return "n/a" if pct is None else f"{pct:+.1f}%"


_JITTER_COLUMNS = (
    ("step us", lambda p: f"{p['mean_us']:.1f}"),
    ("p50 us", lambda p: f"{p['p50_us']:.1f}"),
    ("p99 us", lambda p: f"{p['p99_us']:.1f}"),
    ("overhead", _overhead),
)


def format_jitter_report(report: Mapping[str, Any]) -> str:
    """The human-readable jitter table: loop time per step and overhead over no sync, per path."""
    low, high = report["work_us"]
    share = report["lookahead_over_lockstep_shm"]
    return "\n".join(
        [
            f"loop time per step with {low}-{high} us of CPU work per rank and step (mean "
            f"{report['work_us_mean']:.1f} us), {report['nranks']} ranks, {report['iters']} steps after "
            f"{report['warmup']} warm-up, Paddle {report['paddle_version']}; all ranks' steps pooled",
            *_table(report["paths"], _JITTER_COLUMNS),
            f"lookahead {report['lookahead']} overhead / lockstep shm overhead: "
            + ("n/a (lockstep shm cost nothing)" if share is None else f"{share:.2f}"),
        ]
    )


# --- late src ----------------------------------------------------------------------------------------------------


def _late_path(name: str, label: str, src: dict, readers: Sequence[dict]) -> dict[str, Any]:
    wakes = [
        returned - called
        for reader in readers
        for returned, called in zip(reader["stamps_ns"][name], src["stamps_ns"][name], strict=True)
    ]
    cpu, wall = sum(r["cpu_s"][name] for r in readers), sum(r["wall_s"][name] for r in readers)
    return {
        "label": label,
        "wake_p50_us": percentile_us(wakes, 50),
        "wake_p90_us": percentile_us(wakes, 90),
        "wake_p99_us": percentile_us(wakes, 99),
        "wake_mean_us": mean_us(wakes),
        "samples": len(wakes),
        "reader_cpu_pct": cpu / wall * 100.0 if wall else 0.0,
        "src_publish_p50_us": percentile_us(src["publish_ns"][name], 50),
        "src_publish_p99_us": percentile_us(src["publish_ns"][name], 99),
    }


def build_late_report(
    results: Sequence[dict], *, nranks: int, iters: int, warmup: int, late_ms: float, paddle_version: str
) -> dict[str, Any]:
    """The late-src benchmark's figures per path (the transports, and the futex floor when it ran): the readers'
    wake latency (each reader's return minus the src's call, step by step) at p50/p90/p99 and its mean, the readers'
    CPU share in percent of a core over the timed steps, the src's publishing call at p50 and p99, and the shm wake
    over the floor's at p50 (None without a floor)."""
    src = next(r for r in results if r["rank"] == 0)
    readers = [r for r in results if r["rank"] != 0]
    paths = {
        name: _late_path(name, label, src, readers)
        for name, label in late_src.LABELS.items()
        if name in src["stamps_ns"]
    }
    kind, detail = src["wait"]
    floor = paths.get("futex_floor")
    return {
        "mode": "src_late",
        "nranks": nranks,
        "iters": iters,
        "warmup": warmup,
        "late_ms": late_ms,
        "paddle_version": paddle_version,
        "shm_reader_sleep": {"kind": kind, "detail": detail},
        "paths": paths,
        "shm_wake_over_floor_p50": _ratio(paths["shm"]["wake_p50_us"], floor["wake_p50_us"]) if floor else None,
        "no_floor_because": src["floor"],
    }


_LATE_COLUMNS = (
    ("wake p50", lambda p: f"{p['wake_p50_us']:.1f}"),
    ("wake p90", lambda p: f"{p['wake_p90_us']:.1f}"),
    ("wake p99", lambda p: f"{p['wake_p99_us']:.1f}"),
    ("reader cpu", lambda p: f"{p['reader_cpu_pct']:.1f}%"),
    ("pub p50", lambda p: f"{p['src_publish_p50_us']:.1f}"),
    ("pub p99", lambda p: f"{p['src_publish_p99_us']:.1f}"),
)


def format_late_report(report: Mapping[str, Any]) -> str:
    """The human-readable late-src table: wake latency (us), the readers' CPU share and the src's publish (us) per
    path, then the shm wake over the floor's."""
    sleep = report["shm_reader_sleep"]
    ratio = report["shm_wake_over_floor_p50"]
    over_floor = (
        f"shm wake / bare futex wake: {_times(ratio)} at p50"
        if report["no_floor_because"] is None
        else f"no bare futex floor: {report['no_floor_because']}"
    )
    return "\n".join(
        [
            f"src late by {report['late_ms']:g} ms before each timed publish, {report['nranks']} ranks, "
            f"{report['iters']} steps after {report['warmup']} warm-up, Paddle {report['paddle_version']}; wake = the "
            "reader's return after the src's call, in us",
            *_table(report["paths"], _LATE_COLUMNS),
            over_floor,
            f"a waiting shm reader sleeps in: {sleep['kind']} ({sleep['detail']})",
        ]
    )


# --- plot --------------------------------------------------------------------------------------------------------


def load_pyplot() -> Any:
    """Import matplotlib's pyplot with a file-only backend; ``RuntimeError`` with the install hint when the
    ``plot`` extra is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib, an optional extra: pip install 'fastdeploy-patch[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(results: Sequence[dict], report: Mapping[str, Any], path: str, plt: Any) -> None:
    """Save each path's distribution of per-step times (an empirical CDF, log-scaled time) to ``path``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in pooled(results, report["paths"]).items():
        ordered = np.sort(values) / 1000.0
        fraction = np.arange(1, len(ordered) + 1) / len(ordered)
        summary = report["paths"][name]
        ax.step(ordered, fraction, where="post", label=f"{summary['label']} (p50 {summary['p50_us']:.0f} us)")
    ax.set_xscale("log")
    what = "loop step" if report["mode"] == "jitter" else "signal sync per step"
    ax.set_xlabel(f"{what} (us, log scale)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"{report['nranks']} ranks, {report['iters']} steps, Paddle {report['paddle_version']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
