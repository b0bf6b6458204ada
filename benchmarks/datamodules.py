"""Dynamics-pair throughput: shards vs the folder reader vs the PNG decode ceiling.

Why: training reads the seen-task demos only through shards, so the shard pipeline should
beat reading RLBench folders (unpickling `low_dim_obs.pkl`, one small file per frame) and
come close to the cost that no reader avoids, decoding the PNGs. Targets: shards >= 3x
the folder reader and >= 70% of the decode ceiling. This script measures, in one run:

1. input: the real RLBench sample episodes (`shared/data/rlbench_sample`, found through
   $AGNOSTOS_SHARED_DATA or `<repo>/../shared/data`) copied --copies times each (real
   file copies), converted twice: the standard shards (all five cameras, rgb+depth+mask)
   and front-RGB-only shards (`--cameras front --modalities rgb`, what the dynamics model
   reads); every file is then read once so all methods see a warm page cache. The
   standard shards are also read a second way, ignoring the member index and walking
   every tar header (the reader's cost before shards had indexes, and still its cost on
   version-1 shards), so the index's effect is measured in the same run;
2. for three pair definitions, X-ICM's (frame 0 -> last frame, one pair per episode),
   frame 0 and each keyframe -> the next keyframe (a few pairs per episode) and every
   frame -> last frame (T - 1 pairs per episode): `DynamicsDataModule.train_dataloader()`
   samples/s (128x128, batch 32, --workers DataLoader workers, default shuffle buffer of
   1000) from each shard set and from the folders, and the decode ceiling: the same pairs' PNG bytes
   held in memory, decoded, cropped/resized and collated by the same functions in a
   DataLoader with the same worker count. Each rate is the second of two epochs with
   persistent workers: the first starts the workers and fills the shuffle buffer (the
   training stream continues across epochs), the second is timed, `iter()` included.
   Each measurement runs --repeats times in alternating order; the best run is reported
   and all runs are listed;
3. prints markdown tables and machine facts (including the load average, since another
   job may share the CPU) and writes the same as JSON.

    python benchmarks/datamodules.py [--copies 16] [--workers 2] [--repeats 2]
                                     [--workdir DIR] [--keep] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import webdataset
from machine import machine_facts
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from agnostos.datamodules.dynamics import (
    DecodeDynamics,
    DynamicsDataModule,
    DynamicsSpec,
    ExpandDynamics,
    collate_dynamics,
)
from agnostos.datamodules.streams import StreamState
from agnostos.datamodules.tar_stream import TarSamples
from agnostos.shards.convert import ConvertOptions, convert
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.views import FolderEpisode

REPO = Path(__file__).resolve().parents[1]
BATCH = 32
IMAGE_SIZE = 128
MODES = {  # name -> (input_frame, target_frame, samples per measurement)
    "X-ICM pairs (frame 0 -> last)": ("first", "last", 2048),
    "frame 0 and keyframes -> next keyframe": ("keyframes", "next_keyframe", 3072),
    "every frame -> last": ("all", "last", 6144),
}


def find_sample() -> Path:
    shared = os.environ.get("AGNOSTOS_SHARED_DATA")
    sample = (Path(shared) if shared else REPO.parent / "shared" / "data") / "rlbench_sample"
    if not sample.is_dir() or not discover_episodes(sample):
        raise SystemExit(f"{sample}: the RLBench sample is needed for this benchmark")
    return sample


def build_input(root: Path, copies: int) -> int:
    """Copy every sample episode `copies` times as episode0, episode1, ...; returns bytes."""
    seeds = [location.path for location in discover_episodes(find_sample())]
    episodes = root / seeds[0].parents[2].name / "all_variations" / "episodes"
    episodes.mkdir(parents=True)
    for index in range(copies * len(seeds)):
        shutil.copytree(
            seeds[index % len(seeds)], episodes / f"episode{index}", copy_function=shutil.copyfile
        )
    for folder, _dirs, _names in os.walk(root):
        os.chmod(folder, 0o755)  # the shared sample is read-only; allow cleanup
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def warm_page_cache(*roots: Path) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                with open(path, "rb", buffering=0) as handle:
                    while handle.read(1 << 20):
                        pass


# -- measurements -------------------------------------------------------------------------------


@dataclass
class Measurement:
    mode: str
    method: str
    rates: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # 1-minute load average after each run

    @property
    def best(self) -> float:
        return max(self.rates)


def epoch_rates(loader: Iterable[Any], epochs: int) -> list[float]:
    """Samples/s of each epoch of a persistent-worker loader (clock includes `iter()`): a
    DataLoader, or the `EpochLoader` that `train_dataloader()` returns."""
    rates = []
    for _ in range(epochs):
        started, count = time.perf_counter(), 0
        for batch in loader:
            count += len(batch)
        rates.append(count / (time.perf_counter() - started))
    return rates


class HeaderWalkDynamics(DynamicsDataModule):
    """`DynamicsDataModule` whose shard reader ignores member indexes and walks every tar
    header: what reading cost before shards had indexes (and costs on version-1 shards)."""

    def read_stages(self, entries):
        stages = super().read_stages(entries)
        return [
            dataclasses.replace(stage, use_index=False) if isinstance(stage, TarSamples) else stage
            for stage in stages
        ]


def module_rate(
    source: dict[str, Any], input_frame: str, target_frame: str, samples: int, workers: int
) -> float:
    """Steady-state rate: epoch 1 starts the workers and fills the shuffle buffer (the
    training stream continues across epochs), epoch 2 is timed."""
    source = dict(source)
    kind = source.pop("module", DynamicsDataModule)
    module = kind(
        **source,
        input_frame=input_frame,
        target_frame=target_frame,
        image_size=IMAGE_SIZE,
        batch_size=BATCH,
        num_workers=workers,
        val_episodes_per_task=0,
        epoch_samples=samples,
        seed=0,
    )
    module.setup("fit")
    loader = module.train_dataloader()
    try:
        return epoch_rates(loader, 2)[1]
    finally:
        del loader  # ends the persistent workers before the next measurement


class InMemoryPairs(IterableDataset):
    """The decode ceiling: PNG pairs already in memory, decoded and collated as the pipeline
    does (`DecodeDynamics`, `collate_dynamics`); each worker cycles through its share."""

    def __init__(self, specs: list[DynamicsSpec], batches_per_worker: int):
        self.specs = specs
        self.batches_per_worker = batches_per_worker

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.specs[worker::workers]
        decode = DecodeDynamics(IMAGE_SIZE)
        position = 0
        for _ in range(self.batches_per_worker):
            items = []
            for _ in range(BATCH):
                items.append(decode(mine[position % len(mine)]))
                position += 1
            yield collate_dynamics(items)


def ceiling_specs(folders: Path, input_frame: str, target_frame: str) -> list[DynamicsSpec]:
    expand = ExpandDynamics("front", input_frame, target_frame, 1, "first", False, StreamState(0))
    specs = []
    for location in discover_episodes(folders):
        episode = read_episode(location, ("front",), ("rgb",))
        specs += expand.specs(FolderEpisode(episode, str(location.path)))
    for spec in specs:  # really in memory: force the lazy folder reads now
        assert spec.input_png and spec.target_png
    return specs


def ceiling_rate(specs: list[DynamicsSpec], samples: int, workers: int) -> float:
    """The same two-epoch protocol as `module_rate` (epoch 1 starts the workers)."""
    per_worker = math.ceil(math.ceil(samples / BATCH) / max(1, workers))
    loader = DataLoader(
        InMemoryPairs(specs, per_worker),
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    try:
        return epoch_rates(loader, 2)[1]
    finally:
        del loader


# -- report -------------------------------------------------------------------------------------


def package_facts() -> dict[str, Any]:
    return machine_facts(
        torch=torch.__version__,
        webdataset=webdataset.__version__,
        pillow=PIL.__version__,
        numpy=np.__version__,
    )


def load_average() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def table(mode: str, measurements: list[Measurement]) -> str:
    rows = {m.method: m for m in measurements if m.mode == mode}
    folder, ceiling = rows["folder reader"].best, rows["decode ceiling"].best
    lines = [
        f"**{mode}**",
        "",
        "| method | samples/s (best) | x folder reader | % of decode ceiling | runs "
        "| load after each run |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, m in rows.items():
        runs = ", ".join(f"{rate:.0f}" for rate in m.rates)
        loads = ", ".join(f"{load:.2f}" for load in m.loads)
        lines.append(
            f"| {name} | {m.best:.0f} | {m.best / folder:.2f} | {100 * m.best / ceiling:.0f}% "
            f"| {runs} | {loads} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=16, help="copies of each sample episode")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, default=Path("/tmp/datamodules_benchmark.json"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="dm_bench_", dir=args.workdir))
    load_before = load_average()
    try:
        folders = workdir / "episodes"
        input_bytes = build_input(folders, args.copies)
        episodes = len(discover_episodes(folders))
        full, front = workdir / "shards_all", workdir / "shards_front_rgb"
        convert(folders, full, ConvertOptions(shard_size=200 * 10**6), show_progress=False)
        convert(
            folders,
            front,
            ConvertOptions(cameras=("front",), modalities=("rgb",), shard_size=20 * 10**6),
            show_progress=False,
        )
        warm_page_cache(folders, full, front)
        sources = {
            "shards (all cameras and modalities)": {"shards": str(full)},
            "shards (all cameras and modalities), header walk": {
                "shards": str(full),
                "module": HeaderWalkDynamics,
            },
            "shards (front RGB only)": {"shards": str(front)},
            "folder reader": {"folders": str(folders)},
        }
        measurements = []
        for mode, (input_frame, target_frame, samples) in MODES.items():
            specs = ceiling_specs(folders, input_frame, target_frame)
            rows = [Measurement(mode, name) for name in [*sources, "decode ceiling"]]
            for repeat in range(args.repeats):
                order = rows if repeat % 2 == 0 else rows[::-1]
                for row in order:
                    if row.method == "decode ceiling":
                        rate = ceiling_rate(specs, samples, args.workers)
                    else:
                        rate = module_rate(
                            sources[row.method], input_frame, target_frame, samples, args.workers
                        )
                    row.rates.append(rate)
                    row.loads.append(load_average()[0])
                    print(
                        f"{mode} | {row.method}: {rate:.0f} samples/s (load {row.loads[-1]:.2f})",
                        flush=True,
                    )
            measurements += rows
            del specs
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    facts = package_facts()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": facts,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "input": {"episodes": episodes, "bytes": input_bytes, "copies": args.copies},
        "settings": {
            "batch": BATCH,
            "image_size": IMAGE_SIZE,
            "workers": args.workers,
            "protocol": "epoch 1 warm-up (workers, shuffle buffer), epoch 2 timed",
            "repeats": args.repeats,
        },
        "results": [asdict(m) | {"best": m.best} for m in measurements],
    }
    args.json.write_text(json.dumps(report, indent=1))
    print()
    print(f"machine: {facts}")
    print(f"load average before {load_before}, after {report['load_average_after']}")
    print(f"input: {episodes} episodes, {input_bytes / 1e9:.2f} GB")
    for mode in MODES:
        print()
        print(table(mode, measurements))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
