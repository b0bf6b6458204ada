"""`agnostos demo`: the whole retrieval pipeline on the embedded simulator, on a CPU.

The stages, each resumable (a finished stage is skipped when the command runs again):

1. **demos**: minibench writes scripted demos of the seen tasks (the demo bank's source)
   and of the unseen tasks (the queries), in RLBench's on-disk layout.
2. **shards**: both sets are converted to WebDataset shards and verified.
3. **base**: a tiny Stable-Diffusion-shaped base is built from configs, and its
   autoencoder is fitted to the seen front frames (a real base brings a pretrained one).
4. **train**: the tiny dynamics diffusion model trains on the seen shards through
   `agnostos fit` (LightningCLI, `configs/dynamics/tiny.yaml`), logging to W&B offline,
   and exports `checkpoint-<step>/unet/`.
5. **bank**: features of every seen demo are extracted with the trained model.
6. **retrieve**: for each unseen demo, its first front frame and instruction go through
   the same model; the bank is ranked (X-ICM's `lang_vis_out` by default) and the top-K
   demos are reported with scores. The predicted future frames are saved as images.

Outputs, under `--out`: `summary.txt` (plain text), `summary.json`, `retrievals/*.png`,
the shards, the trained checkpoints and the bank, and offline W&B runs under `wandb/`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agnostos.atomic import atomic_write_bytes, atomic_write_json, replace_directory

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DYNAMICS_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "dynamics" / "tiny.yaml"


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; `configs/demo.yaml` holds the defaults used by `make demo`."""

    out: str = "runs/demo"
    seen_tasks: tuple[str, ...] | None = None
    unseen_tasks: tuple[str, ...] | None = None
    seen_episodes: int = 8
    unseen_episodes: int = 2
    image_size: int = 128
    workers: int = 2
    seed: int = 0
    vae_steps: int = 200
    train_steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-4
    sampling_steps: int = 20
    top_k: int = 5
    ranker: str = "lang_vis_out"
    wandb: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        from agnostos.tasks import MINIBENCH

        for name, known in (("seen_tasks", MINIBENCH.seen), ("unseen_tasks", MINIBENCH.unseen)):
            chosen = getattr(self, name)
            if chosen is None:
                continue
            object.__setattr__(self, name, tuple(chosen))
            unknown = [task for task in chosen if task not in known]
            if unknown or not chosen:
                raise ValueError(
                    f"demo config: {name} has unknown task(s) {unknown} (or none); "
                    f"choose from {list(known)}"
                )
        names = (
            "seen_episodes",
            "unseen_episodes",
            "vae_steps",
            "train_steps",
            "batch_size",
            "top_k",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"demo config: {name} must be >= 1, got {getattr(self, name)}")
        if self.sampling_steps < 1:
            raise ValueError(f"demo config: sampling_steps must be >= 1, got {self.sampling_steps}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DemoConfig:
        """Read a YAML mapping of `DemoConfig` fields; unknown keys are an error naming them."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot read the demo config: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the demo config must be a mapping of settings")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown demo setting(s) {unknown}; known: {sorted(known)}")
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, under the demo's output folder."""

    root: Path

    @property
    def seen_demos(self) -> Path:
        return self.root / "demos" / "seen"

    @property
    def unseen_demos(self) -> Path:
        return self.root / "demos" / "unseen"

    @property
    def seen_shards(self) -> Path:
        return self.root / "shards" / "seen"

    @property
    def unseen_shards(self) -> Path:
        return self.root / "shards" / "unseen"

    @property
    def base(self) -> Path:
        return self.root / "tiny-base"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def bank(self) -> Path:
        return self.root / "bank"

    @property
    def retrievals(self) -> Path:
        return self.root / "retrievals"

    @property
    def stages(self) -> Path:
        return self.root / "stages"


def _stage_done(paths: DemoPaths, name: str) -> dict[str, Any] | None:
    marker = paths.stages / f"{name}.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _finish_stage(paths: DemoPaths, name: str, record: dict[str, Any]) -> dict[str, Any]:
    paths.stages.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.stages / f"{name}.json", record)
    return record


def _log(message: str) -> None:
    print(f"[agnostos demo] {message}", flush=True)


def make_demos(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    """Stage 1: scripted minibench demos of the seen and unseen tasks (resumes per episode)."""
    from agnostos.envs.minibench.generate import generate
    from agnostos.tasks import MINIBENCH

    record: dict[str, Any] = {}
    for split, tasks, episodes, out in (
        ("seen", config.seen_tasks or MINIBENCH.seen, config.seen_episodes, paths.seen_demos),
        (
            "unseen",
            config.unseen_tasks or MINIBENCH.unseen,
            config.unseen_episodes,
            paths.unseen_demos,
        ),
    ):
        _log(f"generating {episodes} {split} demo(s) for each of {len(tasks)} tasks")
        started = time.monotonic()
        summary = generate(
            tasks, episodes, out, seed=config.seed, image_size=config.image_size,
            workers=config.workers, progress=config.progress,
        )  # fmt: skip
        record[split] = {
            "tasks": list(tasks),
            "episodes": sum(item.written + item.already_present for item in summary.values()),
            "failed_attempts": sum(item.failed_attempts for item in summary.values()),
            "seconds": round(time.monotonic() - started, 1),
        }
    return record


def make_shards(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    """Stage 2: convert both demo sets to shards and verify them."""
    from agnostos.shards.convert import ConvertOptions, convert
    from agnostos.shards.verify import verify

    record: dict[str, Any] = {}
    for split, src, out in (
        ("seen", paths.seen_demos, paths.seen_shards),
        ("unseen", paths.unseen_demos, paths.unseen_shards),
    ):
        started = time.monotonic()
        result = convert(src, out, ConvertOptions(shard_size=200_000_000), show_progress=False)
        report = verify(out)
        if not report.ok:
            raise RuntimeError(f"{out}: shard verification failed: {report.faults[0]}")
        record[split] = {
            "episodes": len(result.manifest.episodes),
            "shards": len(result.manifest.shards),
            "seconds": round(time.monotonic() - started, 1),
        }
        _log(f"{split}: {record[split]['episodes']} episodes in {record[split]['shards']} shard(s)")
    return record


@dataclass(frozen=True)
class RetrievedDemo:
    """One bank entry chosen for a query, with its rank score."""

    demo_id: str
    task: str
    score: float


@dataclass(frozen=True)
class QueryResult:
    """The top-K retrieval for one unseen-task demo, and where its images were saved."""

    task: str
    level: str
    episode: int
    instruction: str
    image: str
    retrieved: tuple[RetrievedDemo, ...]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def image_strip(images: Sequence[np.ndarray], size: int, gap: int = 4) -> np.ndarray:
    """HxWx3 uint8 images, each resized (nearest) to size x size, side by side on white."""
    from agnostos.images import resize_nearest, tile_images

    strip = tile_images([[resize_nearest(image, size) for image in images]], padding=gap)
    return strip[gap:-gap, gap:-gap]


def save_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB PNG atomically."""
    from agnostos.shards.codecs import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_png(image))


def format_summary(config: DemoConfig, results: Sequence[QueryResult], timings: dict) -> str:
    """The plain-text report: per unseen task and demo, the top-K seen demos with scores."""
    lines = [
        "agnostos demo: cross-task demo retrieval on minibench",
        f"ranker: {config.ranker}, top-{config.top_k}, seed {config.seed}, "
        f"{config.train_steps} training steps, {config.sampling_steps} sampling steps",
        "images: query frame 0 | predicted future | true last frame | top-1 demo frame 0 "
        "| top-1 demo last frame",
        "",
    ]
    for result in results:
        lines.append(
            f"{result.task} ({result.level}) episode {result.episode}: {result.instruction!r}"
        )
        for rank, item in enumerate(result.retrieved, start=1):
            lines.append(f"  {rank}. {item.demo_id:<48} score {item.score:12.4f}")
        lines.append(f"  image: {result.image}")
    lines.append("")
    lines.append("seen tasks retrieved per unseen task (all ranks):")
    for task in dict.fromkeys(result.task for result in results):
        counts = Counter(
            item.task for result in results if result.task == task for item in result.retrieved
        )
        picked = ", ".join(f"{name} x{count}" for name, count in counts.most_common())
        lines.append(f"  {task:<24} {picked}")
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return "\n".join(lines) + "\n"


def log_to_wandb(
    config: DemoConfig, paths: DemoPaths, results: Sequence[QueryResult], timings: dict
) -> str | None:
    """One offline W&B run with the retrieval table (images included); returns its folder."""
    import wandb

    run = wandb.init(
        project="agnostos-demo",
        name="retrieval",
        group=paths.root.resolve().name,
        job_type="retrieval",
        dir=str(paths.root),
        mode="offline",
        config=asdict(config),
    )
    try:
        table = wandb.Table(
            columns=["unseen_task", "level", "episode", "instruction", "rank", "demo", "demo_task",
                     "score", "images"]
        )  # fmt: skip
        for result in results:
            image = wandb.Image(str(paths.root / result.image))
            for rank, item in enumerate(result.retrieved, start=1):
                table.add_data(
                    result.task, result.level, result.episode, result.instruction, rank,
                    item.demo_id, item.task, item.score, image,
                )  # fmt: skip
        run.log({"retrieval": table})
        run.summary.update({f"seconds/{key}": value for key, value in timings.items()})
        return str(run.dir)
    finally:
        run.finish()


def make_tiny_base(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    """Stage 3: the tiny SD-shaped base, its autoencoder fitted to the seen front frames.

    A real base (SD2) brings a pretrained VAE; the tiny one is random, so without this its
    predicted futures would decode to noise. Built in a scratch folder and renamed, so a
    killed stage starts again from scratch and gives the same weights.
    """
    import shutil

    import torch

    from agnostos.images import prepare_rgb
    from agnostos.models.tiny import TinySpec, build_tiny_base, fit_tiny_vae
    from agnostos.shards.convert import shard_urls
    from agnostos.shards.reading import iter_episodes

    spec = TinySpec(seed=config.seed)
    frames = [
        prepare_rgb(episode.png("front", "rgb", index), spec.image_size)
        for episode in iter_episodes(shard_urls(paths.seen_shards))
        for index in range(0, episode.num_frames, 3)
    ]
    scratch = paths.base.with_name(paths.base.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    build_tiny_base(scratch, spec)
    _log(f"fitting the tiny base's autoencoder on {len(frames)} seen front frames")
    fit = fit_tiny_vae(
        scratch, torch.stack(frames), steps=config.vae_steps, batch_size=16, seed=config.seed
    )
    replace_directory(scratch, paths.base)
    return {"base": str(paths.base), "frames": len(frames), **asdict(fit)}


def _latest_export(train_dir: Path) -> Path | None:
    exports = sorted(
        (train_dir / "export").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
    )
    return exports[-1] if exports else None


def train_dynamics(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    """Stage 3: `agnostos fit` with the tiny config on the seen shards (resumes from last.ckpt)."""
    from agnostos.trainers.cli import run_fit

    argv = [
        "fit",
        "--config", str(DYNAMICS_CONFIG),
        "--data.shards", str(paths.seen_shards),
        "--data.batch_size", str(config.batch_size),
        "--data.seed", str(config.seed),
        "--model.learning_rate", str(config.learning_rate),
        "--model.seed", str(config.seed),
        "--model.base", str(paths.base),
        "--seed_everything", str(config.seed),
        "--trainer.max_steps", str(config.train_steps),
        "--trainer.default_root_dir", str(paths.train),
        "--trainer.enable_progress_bar", str(config.progress).lower(),
        "--export.every_n_train_steps", "0",
    ]  # fmt: skip
    if not config.wandb:
        argv += ["--trainer.logger", "false"]
    last = sorted(paths.train.rglob("last.ckpt"))
    if last:
        argv += ["--ckpt_path", str(last[-1])]
    _log(f"training the tiny dynamics model: agnostos {' '.join(argv)}")
    status = run_fit(argv)
    if status != 0:
        raise RuntimeError(f"agnostos fit exited with status {status}")
    export = _latest_export(paths.train)
    if export is None:
        raise RuntimeError(f"{paths.train / 'export'}: training finished without an export")
    return {"export": str(export), "base": str(paths.base)}


def _sampling(config: DemoConfig):
    from agnostos.models.dynamics_diffusion import SamplingConfig

    return SamplingConfig(num_inference_steps=config.sampling_steps)


def _model_resolution(model) -> int:
    return int(model.unet.config.sample_size) * model.vae_scale_factor


def build_demo_bank(config: DemoConfig, paths: DemoPaths, trained: dict[str, Any]) -> dict:
    """Stage 4: the bank of seen demos, with demo text and predicted-future images."""
    from agnostos.evaluation.bank import BankBuildConfig, build_bank, load_model

    model, identity = load_model(trained["export"], base=trained["base"])
    build = BankBuildConfig(
        shards=str(paths.seen_shards), seed=config.seed, sampling=_sampling(config),
        resolution=_model_resolution(model), suite="minibench", demo_text="required",
        save_images=True,
    )  # fmt: skip
    _log(f"building the demo bank from {paths.seen_shards} with {trained['export']}")
    result = build_bank(build, model, identity, paths.bank, progress=config.progress)
    if not result.complete:
        raise RuntimeError(f"{paths.bank}: the bank build stopped before the end")
    return {"demos": result.demos_done, "dir": str(paths.bank)}


def _first_and_last(episode) -> list[np.ndarray]:
    return [episode.rgb("front", 0), episode.rgb("front", episode.num_frames - 1)]


def retrieve(config: DemoConfig, paths: DemoPaths, trained: dict[str, Any]) -> list[QueryResult]:
    """Stage 6: rank the bank for every unseen demo and save its image strip.

    Two streaming passes keep memory flat: the unseen demos (features, ranking, their own
    frames), then the seen shards for just the frames of each query's best demo.
    """
    from agnostos.evaluation.bank import DemoBank, extract_features, load_model
    from agnostos.evaluation.rankers import RankingQuery, make_ranker
    from agnostos.images import prepare_rgb
    from agnostos.models.dynamics_diffusion import derive_seed
    from agnostos.shards.convert import shard_urls
    from agnostos.shards.reading import iter_episodes
    from agnostos.tasks import MINIBENCH

    model, _ = load_model(trained["export"], base=trained["base"])
    resolution = _model_resolution(model)
    bank = DemoBank.load(paths.bank)
    ranking_bank = bank.to_ranking_bank()
    ranker = make_ranker(config.ranker)
    results, strips = [], []
    for episode in iter_episodes(shard_urls(paths.unseen_shards)):
        seed = derive_seed(episode.task, episode.episode, config.seed)
        pixels = prepare_rgb(episode.png("front", "rgb", 0), resolution)
        features = extract_features(
            model, pixels[None], [episode.instruction], [seed], _sampling(config), decode=True
        )
        query = RankingQuery(
            output_latent=features.output_latents[0].numpy(),
            prompt_bos=features.prompt_bos[0].numpy(),
            text_embedding=features.prompt_pooled[0].numpy(),
            seed=seed,
        )
        ranking = ranker.rank(ranking_bank, query, min(config.top_k, len(ranking_bank)))
        first, last = _first_and_last(episode)
        strips.append((ranking.ids[0], [first, features.images[0].numpy(), last]))
        image = Path("retrievals") / f"{episode.task}_episode{episode.episode}.png"
        retrieved = tuple(
            RetrievedDemo(demo_id, bank.record(demo_id).task, float(score))
            for demo_id, score in ranking.pairs()
        )
        result = QueryResult(
            task=episode.task, level=MINIBENCH.level_of(episode.task), episode=episode.episode,
            instruction=episode.instruction, image=str(image), retrieved=retrieved,
        )  # fmt: skip
        results.append(result)
    wanted = {best for best, _ in strips}
    best_frames = {
        episode.key: _first_and_last(episode)
        for episode in iter_episodes(shard_urls(paths.seen_shards))
        if episode.key in wanted
    }
    for result, (best, tiles) in zip(results, strips, strict=True):
        save_png(
            paths.root / result.image, image_strip([*tiles, *best_frames[best]], config.image_size)
        )
    return results


def run_demo(config: DemoConfig) -> Path:
    """Run (or resume) every stage; returns the path of the text summary."""
    paths = DemoPaths(Path(config.out))
    paths.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timings: dict[str, float] = {}
    records: dict[str, Any] = {}
    for name, stage in (
        ("demos", lambda: make_demos(config, paths)),
        ("shards", lambda: make_shards(config, paths)),
        ("base", lambda: make_tiny_base(config, paths)),
        ("train", lambda: train_dynamics(config, paths)),
        ("bank", lambda: build_demo_bank(config, paths, records["train"])),
    ):
        started = time.monotonic()
        done = _stage_done(paths, name)
        if done is not None:
            _log(f"stage {name}: already done ({paths.stages / (name + '.json')})")
            records[name] = done
            continue
        records[name] = _finish_stage(paths, name, stage())
        timings[name] = time.monotonic() - started
    started = time.monotonic()
    results = retrieve(config, paths, records["train"])
    timings["retrieve"] = time.monotonic() - started
    summary = format_summary(config, results, timings)
    atomic_write_bytes(paths.root / "summary.txt", summary.encode())
    atomic_write_json(
        paths.root / "summary.json",
        {"config": asdict(config), "stages": records, "seconds": timings,
         "retrievals": [result.as_json() for result in results]},
    )  # fmt: skip
    if config.wandb:
        records["wandb"] = log_to_wandb(config, paths, results, timings)
    sys.stdout.write(summary)
    _log(f"summary: {paths.root / 'summary.txt'}")
    return paths.root / "summary.txt"
