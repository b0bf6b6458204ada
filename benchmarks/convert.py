"""Shard conversion throughput measured against `tar` on the same input.

Why: `agnostos shards convert` copies every PNG unchanged (it only checks chunk CRCs) and
adds a small JSON and npz per episode, so its work is close to archiving the same files.
GNU tar is therefore the natural yardstick, and the target is "conversion with one
worker reaches at least 0.7x tar's throughput". This script measures both on one input,
on this machine, in one run:

1. builds >= --size-gb GB of input by copying the real RLBench sample episodes
   (`shared/data/rlbench_sample`, located through $AGNOSTOS_SHARED_DATA or
   `<repo>/../shared/data`) with real file copies, or synthetic episodes when the sample
   is absent;
2. reads every input file once, so all measurements see a warm page cache, then runs
   every method once untimed (on a VM the first ~1 GB written is much slower);
3. times `tar -cf`, `tar -cf` plus an fsync of the archive (the converter fsyncs each
   shard, so this is the like-for-like baseline), and the converter with 1 and 2 workers
   (in-process Python API: imports happen once before any timing; the process-pool
   start-up of workers=2 is timed). Each measurement runs --repeats times in alternating
   order (forward, then reversed, ...) and the best time is kept. Outputs are deleted and
   `sync` is called between measurements, untimed, so no run pays for another's writeback;
4. prints a markdown table and the machine facts, and writes the same as JSON.

The numbers are for reading, not asserted anywhere: see docs/benchmarks.md.

    python benchmarks/convert.py [--size-gb 1.0] [--workdir DIR] [--keep] [--json PATH]
                                 [--repeats 2] [--warmups 1] [--profile N]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_facts

from agnostos.shards.convert import ConvertOptions, convert, parse_size
from agnostos.shards.folders import discover_episodes

REPO = Path(__file__).resolve().parents[1]
SAMPLE_NAME = "rlbench_sample"
INPUT_SUFFIXES = (".png", ".pkl")
READ_CHUNK = 1 << 20


# -- input ------------------------------------------------------------------------------


@dataclass
class InputInfo:
    """What the benchmark converts: where it came from and how big it is."""

    kind: str  # "rlbench_sample" or "synthetic"
    source: str
    episodes: int
    files: int
    bytes: int  # PNG + pkl bytes only
    build_seconds: float


def find_sample() -> Path | None:
    """The shared RLBench sample folder, or None when this checkout has none."""
    shared = os.environ.get("AGNOSTOS_SHARED_DATA")
    data = Path(shared) if shared else REPO.parent / "shared" / "data"
    sample = data / SAMPLE_NAME
    return sample if sample.is_dir() and discover_episodes(sample) else None


def write_synthetic_seeds(root: Path) -> list[Path]:
    """Two synthetic episodes (128 px, ~130 frames) to replicate when the sample is absent.

    Synthetic images compress far better than real renders (~1 MB per episode instead of
    ~20 MB), so per-file costs weigh more in this fallback than on real data.
    """
    from agnostos.shards.synthetic import SyntheticSpec, write_synthetic_episode

    return [
        write_synthetic_episode(
            root, SyntheticSpec(episode=index, variation=index, image_size=128, segment_frames=40)
        )
        for index in range(2)
    ]


def payload_size(root: Path) -> tuple[int, int]:
    """(bytes, files) of the PNG and pickle files under `root`."""
    total = files = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if name.endswith(INPUT_SUFFIXES):
                total += os.path.getsize(os.path.join(folder, name))
                files += 1
    return total, files


def make_writable(root: Path) -> None:
    """The shared sample is read-only and copytree copies folder modes; allow cleanup."""
    for folder, _dirs, _names in os.walk(root):
        os.chmod(folder, 0o755)


def build_input(input_root: Path, size_bytes: int, scratch: Path) -> InputInfo:
    """Copy seed episodes as episode0, episode1, ... until the input holds >= size_bytes."""
    started = time.perf_counter()
    sample = find_sample()
    if sample is not None:
        kind, source = "rlbench_sample", str(sample)
        seeds = [location.path for location in discover_episodes(sample)]
    else:
        kind, source = "synthetic", "agnostos.shards.synthetic (image_size=128)"
        seeds = write_synthetic_seeds(scratch / "seeds")
    task = seeds[0].parents[2].name
    episodes_dir = input_root / task / "all_variations" / "episodes"
    episodes_dir.mkdir(parents=True)
    seed_sizes = [payload_size(seed) for seed in seeds]
    total = files = count = 0
    while total < size_bytes:
        seed_index = count % len(seeds)
        target = episodes_dir / f"episode{count}"
        # Real copies (copyfile, not hard or symbolic links), like a real download.
        shutil.copytree(seeds[seed_index], target, copy_function=shutil.copyfile)
        total += seed_sizes[seed_index][0]
        files += seed_sizes[seed_index][1]
        count += 1
    make_writable(input_root)
    if kind == "synthetic":
        shutil.rmtree(scratch / "seeds")
    return InputInfo(kind, source, count, files, total, time.perf_counter() - started)


def warm_page_cache(root: Path) -> float:
    """Read every file under `root` once; returns the seconds it took.

    (`tar -cf /dev/null` would not do: GNU tar skips reading file data for /dev/null.)
    """
    started = time.perf_counter()
    for folder, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb", buffering=0) as handle:
                while handle.read(READ_CHUNK):
                    pass
    return time.perf_counter() - started


# -- measurements -----------------------------------------------------------------------


@dataclass
class Measurement:
    name: str
    seconds: list[float] = field(default_factory=list)
    output_bytes: int = 0

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_tar(workdir: Path, fsync: bool) -> tuple[float, int]:
    """`tar -cf <workdir>/tar_out.tar -C <workdir>/input .`, optionally fsynced."""
    archive = workdir / "tar_out.tar"
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(archive), "-C", str(workdir / "input"), "."], check=True)
    if fsync:
        with open(archive, "rb") as handle:
            os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    return elapsed, archive.stat().st_size


def run_convert(workdir: Path, workers: int, shard_size: int, episodes: int) -> tuple[float, int]:
    """One conversion into a fresh `<workdir>/shards_w<N>`; checks every episode arrived."""
    out = workdir / f"shards_w{workers}"
    started = time.perf_counter()
    result = convert(
        workdir / "input",
        out,
        ConvertOptions(shard_size=shard_size),
        workers=workers,
        show_progress=False,
    )
    elapsed = time.perf_counter() - started
    totals = result.manifest.to_json()["totals"]
    if totals["episodes"] != episodes or totals["skipped"]:
        raise RuntimeError(f"conversion wrote {totals}, expected {episodes} episodes")
    return elapsed, totals["bytes"]


def clear_outputs(workdir: Path) -> None:
    """Delete every measurement's output and flush dirty pages (untimed, between runs)."""
    (workdir / "tar_out.tar").unlink(missing_ok=True)
    for out in workdir.glob("shards_w*"):
        shutil.rmtree(out)
    os.sync()


def measure_all(
    workdir: Path, info: InputInfo, shard_size: int, repeats: int, warmups: int
) -> list[Measurement]:
    """Every method `warmups` times untimed, then `repeats` times timed, alternating order.

    The untimed pass matters on virtual machines: the first time ~1 GB of output is
    written, the guest touches fresh memory for the page cache, which made whichever
    method ran first up to 2x slower here even with the input already cached.
    """
    methods: list[tuple[Measurement, Callable[[], tuple[float, int]]]] = [
        (Measurement("tar -cf"), lambda: run_tar(workdir, fsync=False)),
        (Measurement("tar -cf + fsync"), lambda: run_tar(workdir, fsync=True)),
        (
            Measurement("convert, workers=1"),
            lambda: run_convert(workdir, 1, shard_size, info.episodes),
        ),
        (
            Measurement("convert, workers=2"),
            lambda: run_convert(workdir, 2, shard_size, info.episodes),
        ),
    ]
    for warmup in range(warmups):
        for measurement, run in methods:
            clear_outputs(workdir)
            seconds, _ = run()
            print(f"  warm-up {warmup + 1}: {measurement.name:<20} {seconds:7.2f} s (untimed)")
    for repeat in range(repeats):
        order = methods if repeat % 2 == 0 else methods[::-1]
        for measurement, run in order:
            clear_outputs(workdir)
            seconds, output_bytes = run()
            measurement.seconds.append(seconds)
            measurement.output_bytes = output_bytes
            print(f"  pass {repeat + 1}: {measurement.name:<20} {seconds:7.2f} s", flush=True)
    clear_outputs(workdir)
    return [measurement for measurement, _ in methods]


def profile_convert(workdir: Path, shard_size: int, episodes: int, top: int) -> str:
    """cProfile of one workers=1 conversion (not part of the timings), top functions by tottime."""
    clear_outputs(workdir)
    profiler = cProfile.Profile()
    profiler.enable()
    run_convert(workdir, 1, shard_size, episodes)
    profiler.disable()
    clear_outputs(workdir)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


# -- report -----------------------------------------------------------------------------


def tar_machine_facts() -> dict[str, Any]:
    tar_version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
    return machine_facts(
        numpy=np.__version__,
        tar=tar_version.splitlines()[0] if tar_version else "unknown",
    )


def results_table(measurements: list[Measurement], info: InputInfo) -> list[dict[str, Any]]:
    tar, tar_fsync = measurements[0].best, measurements[1].best
    tar_median = measurements[0].median
    return [
        {
            "method": m.name,
            "seconds": round(m.best, 3),
            "median_seconds": round(m.median, 3),
            "x_tar_median": round(tar_median / m.median, 2),
            "runs": [round(s, 3) for s in m.seconds],
            "mb_per_s": round(info.bytes / 1e6 / m.best, 1),
            "episodes_per_s": round(info.episodes / m.best, 2),
            "x_tar": round(tar / m.best, 2),
            "x_tar_fsync": round(tar_fsync / m.best, 2),
            "output_bytes": m.output_bytes,
        }
        for m in measurements
    ]


def markdown(
    rows: list[dict[str, Any]],
    info: InputInfo,
    facts: dict[str, Any],
    repeats: int,
    warmups: int,
    warm_s: float,
) -> str:
    lines = [
        f"Input: {info.bytes / 1e9:.3f} GB of PNG + pkl in {info.files} files, "
        f"{info.episodes} episodes ({info.kind}: {info.source}), built in "
        f"{info.build_seconds:.1f} s.",
        f"Page cache warmed by reading every input file once ({warm_s:.1f} s), then "
        f"{warmups} untimed pass(es) of every method; best of {repeats} timed passes, order "
        "reversed on alternate passes; outputs deleted and `sync` run between measurements "
        "(untimed). Converter timed in-process through the Python API (imports excluded, "
        "workers=2 pool start-up included).",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu_model']}), {facts['ram_gib']} GiB RAM, "
        f"Python {facts['python']}, numpy {facts['numpy']}, {facts['tar']}, "
        f"Linux {facts['kernel']}.",
        "",
        "| method | best s | MB/s | episodes/s | x tar | x tar+fsync | median s | x tar (medians) "
        "| runs (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        runs = ", ".join(f"{seconds:.2f}" for seconds in row["runs"])
        lines.append(
            f"| {row['method']} | {row['seconds']:.2f} | {row['mb_per_s']:.0f} | "
            f"{row['episodes_per_s']:.2f} | {row['x_tar']:.2f} | {row['x_tar_fsync']:.2f} | "
            f"{row['median_seconds']:.2f} | {row['x_tar_median']:.2f} | {runs} |"
        )
    lines.append("")
    lines.append(
        "MB/s and episodes/s are input PNG + pkl bytes (10^6) and episodes per second, from "
        "the best pass; the x columns divide tar's time by the method's (best by best, "
        "median by median)."
    )
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="input size (10^9 bytes)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir in /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (input) at the end")
    parser.add_argument(
        "--json", type=Path, default=None, help="default: <workdir>/../convert_benchmark.json"
    )
    parser.add_argument("--shard-size", default="1GB", help="converter shard size (default 1GB)")
    parser.add_argument("--repeats", type=int, default=4, help="passes per method; best is kept")
    parser.add_argument(
        "--warmups", type=int, default=1, help="untimed passes of every method before timing"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also cProfile one extra workers=1 conversion and print the top N by tottime",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="agnostos-convert-bench-", dir="/tmp"))
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            raise SystemExit(f"{workdir}: work dir must be empty or not exist")
    json_path = args.json or workdir.parent / "convert_benchmark.json"
    shard_size = parse_size(args.shard_size)
    try:
        print(f"building {args.size_gb} GB of input in {workdir / 'input'} ...", flush=True)
        info = build_input(workdir / "input", int(args.size_gb * 1e9), workdir)
        os.sync()
        warm_s = warm_page_cache(workdir / "input")
        print(f"input: {info.episodes} episodes, {info.bytes / 1e9:.3f} GB; timing ...", flush=True)
        measurements = measure_all(workdir, info, shard_size, args.repeats, args.warmups)
        rows = results_table(measurements, info)
        facts = tar_machine_facts()
        print()
        print(markdown(rows, info, facts, args.repeats, args.warmups, warm_s))
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": facts,
            "input": asdict(info),
            "warm_up_seconds": round(warm_s, 3),
            "repeats": args.repeats,
            "warmup_passes": args.warmups,
            "shard_size": shard_size,
            "results": rows,
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON: {json_path}")
        if args.profile:
            print(f"\ncProfile of one workers=1 conversion (top {args.profile} by tottime):")
            print(profile_convert(workdir, shard_size, info.episodes, args.profile))
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
