"""`agnostos demo`: the whole retrieval pipeline on the embedded simulator, on a CPU.

The stages (`demo_stages`), run through `agnostos.stages.StageRunner`:

1. **seen_demos, unseen_demos**: minibench writes scripted demos of the seen tasks (the
   demo bank's source) and of the unseen tasks (the queries), in RLBench's on-disk layout.
2. **seen_shards, unseen_shards**: each set is converted to WebDataset shards and verified.
3. **base**: a tiny Stable-Diffusion-shaped base is built from configs, and its
   autoencoder is fitted to the seen front frames (a real base brings a pretrained one).
4. **train**: the tiny dynamics diffusion model trains on the seen shards through
   `agnostos fit` (LightningCLI, `configs/dynamics/tiny.yaml`), logging to W&B offline,
   and exports `checkpoint-<step>/unet/`.
5. **bank**: features of every seen demo are extracted with the trained model.
6. **retrieve**: for each unseen demo, its first front frame and instruction go through
   the same model; the bank is ranked (X-ICM's `lang_vis_out` by default) and the top-K
   demos are kept with scores. Image strips with the predicted future are saved.
7. **eval**: X-ICM with the embedded LLM (SmolLM2-135M-Instruct) runs through the rollout
   evaluator on stored test episodes of every unseen task, with `lang_vis_out` and with
   `random` ranking, and the AGNOSTOS-style table is reported (`agnostos.demo_eval`).

Each stage records a fingerprint of its settings and of the stages it reads. Run the
command again and a stage is skipped only when its fingerprint is unchanged; a changed
setting re-runs that stage and every stage that depends on it, and the summary is written
from what the stages recorded, never from the current flags.

Outputs, under `--out`: `summary.txt` (plain text), `summary.json`, `retrievals/*.png`,
the shards, the trained checkpoints and the bank, `stages/*.json` (the records), and
offline W&B runs under `wandb/`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agnostos.atomic import atomic_write_bytes, atomic_write_json, replace_directory
from agnostos.resources import packaged_config
from agnostos.stages import Stage, StageRecord, StageRunner

DEMO_CONFIG = packaged_config("demo.yaml")
DYNAMICS_CONFIG = packaged_config("dynamics/tiny.yaml")


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
    eval_episodes: int = 2
    eval_max_steps: int = 25
    eval_workers: int = 4
    eval_top_k: int = 3
    llm: str = "smollm2"
    llm_decoding: str = "constrained"
    llm_max_new_tokens: int = 64
    llm_threads: int = 2
    vla_steps: int = 120
    vla_batch_size: int = 8
    vla_learning_rate: float = 3e-3
    vla_rollout_episodes: int = 1
    wandb: bool = True
    progress: bool = True

    # Lower bounds of the integer settings; an int setting not listed here may be any int.
    _MINIMA = (
        ("seen_episodes", 1), ("unseen_episodes", 1), ("image_size", 1), ("workers", 1),
        ("vae_steps", 1), ("train_steps", 1), ("batch_size", 1), ("sampling_steps", 1),
        ("top_k", 1), ("eval_episodes", 1), ("eval_max_steps", 1), ("eval_workers", 1),
        ("eval_top_k", 1), ("llm_max_new_tokens", 1), ("llm_threads", 1), ("vla_steps", 2),
        ("vla_batch_size", 1), ("vla_rollout_episodes", 1),
    )  # fmt: skip

    def __post_init__(self) -> None:
        """Check (and normalise) every setting, so a bad one stops the demo before stage 1
        instead of minutes later in the stage that first uses it."""
        current = {item.name: getattr(self, item.name) for item in fields(self)}
        for name, value in self._checked(current, "demo config").items():
            object.__setattr__(self, name, value)

    @classmethod
    def _checked(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
        """`values` (some or all settings) type- and range-checked, lists made tuples.

        Raises ValueError `<where>: <key> must be ..., got <value>`, naming the allowed
        values where there is a fixed set.
        """
        kinds = {item.name: item.type for item in fields(cls)}
        return {name: cls._check(name, kinds[name], value, where) for name, value in values.items()}

    @classmethod
    def _check(cls, name: str, kind: Any, value: Any, where: str) -> Any:
        def refuse(expected: str, hint: str = "") -> ValueError:
            return ValueError(f"{where}: {name} must be {expected}, got {value!r}{hint}")

        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise refuse("an integer")
            minimum = dict(cls._MINIMA).get(name)
            if minimum is not None and value < minimum:
                raise refuse(f">= {minimum}")
            return value
        if kind == "float":
            if isinstance(value, str):
                try:
                    float(value)
                except ValueError:
                    pass
                else:  # YAML 1.1 reads 1e-4 as text; 1.0e-4 is a number
                    raise refuse("a number", " (YAML reads it as text: write e.g. 1.0e-4)")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise refuse("a number")
            if not 0 < value < float("inf"):
                raise refuse("a positive number")
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise refuse("true or false")
            return value
        if kind == "str" and name == "llm_decoding":
            from agnostos.models.llm import DECODINGS

            if value not in DECODINGS:
                raise refuse(f"one of {', '.join(DECODINGS)}")
            return value
        if kind == "str" and name == "ranker":
            from agnostos.evaluation.rankers import RANKER_NAMES as names

            if not isinstance(value, str) or value not in names:
                raise refuse(f"one of {', '.join(names)}")
            return value
        if kind == "str":
            if not isinstance(value, (str, os.PathLike)):
                raise refuse("a folder path")
            return os.fspath(value)
        if kind == "tuple[str, ...] | None":
            return cls._check_tasks(name, value, where)
        raise TypeError(f"DemoConfig.{name}: no check for settings of type {kind}")

    @staticmethod
    def _check_tasks(name: str, value: Any, where: str) -> tuple[str, ...] | None:
        from agnostos.tasks import MINIBENCH

        if value is None:
            return None
        known = {"seen_tasks": MINIBENCH.seen, "unseen_tasks": MINIBENCH.unseen}[name]
        choices = f"choose from {', '.join(known)}"
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: {name} must be a list of task names, got {value!r}")
        if not value:
            raise ValueError(f"{where}: {name} must name at least one task; {choices}")
        unknown = [task for task in value if task not in known]
        if unknown:
            listed = ", ".join(repr(task) for task in unknown)
            raise ValueError(f"{where}: {name} has unknown task(s) {listed}; {choices}")
        repeated = sorted({task for task in value if list(value).count(task) > 1})
        if repeated:
            raise ValueError(f"{where}: {name} lists {', '.join(repeated)} more than once")
        return tuple(value)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DemoConfig:
        """Read a YAML mapping of `DemoConfig` fields; unknown keys are an error naming them.

        The file's values are checked first, so an error names the file; `overrides` (the
        command-line flags, None meaning "not given") are checked as `demo config`.
        """
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot read the demo config: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the demo config must be a mapping of settings")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ValueError(f"{path}: unknown demo setting(s) {unknown}; known: {sorted(known)}")
        values = cls._checked(values, str(path))
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


def _log(message: str) -> None:
    print(f"[agnostos demo] {message}", flush=True)


def _tasks(config: DemoConfig, split: str) -> tuple[str, ...]:
    from agnostos.tasks import MINIBENCH

    if split == "seen":
        return config.seen_tasks or MINIBENCH.seen
    return config.unseen_tasks or MINIBENCH.unseen


def _demo_settings(config: DemoConfig, split: str) -> dict[str, Any]:
    episodes = config.seen_episodes if split == "seen" else config.unseen_episodes
    return {
        "tasks": list(_tasks(config, split)),
        "episodes": episodes,
        "image_size": config.image_size,
        "seed": config.seed,
    }


def make_demos(config: DemoConfig, out: Path, split: str) -> dict[str, Any]:
    """Stages seen_demos / unseen_demos: scripted minibench demos (resumes per episode)."""
    from agnostos.envs.minibench.generate import generate

    settings = _demo_settings(config, split)
    tasks = settings["tasks"]
    _log(f"generating {settings['episodes']} {split} demo(s) for each of {len(tasks)} tasks")
    summary = generate(
        tasks, settings["episodes"], out, seed=config.seed, image_size=config.image_size,
        workers=config.workers, progress=config.progress,
    )  # fmt: skip
    return {
        "tasks": tasks,
        "episodes": sum(item.written + item.already_present for item in summary.values()),
        "failed_attempts": sum(item.failed_attempts for item in summary.values()),
    }


def make_shards(src: Path, out: Path, split: str) -> dict[str, Any]:
    """Stages seen_shards / unseen_shards: convert one demo set to shards and verify them."""
    from agnostos.shards.convert import ConvertOptions, convert
    from agnostos.shards.verify import verify

    result = convert(src, out, ConvertOptions(shard_size=200_000_000), show_progress=False)
    report = verify(out)
    if not report.ok:
        raise RuntimeError(f"{out}: shard verification failed: {report.faults[0]}")
    record = {"episodes": len(result.manifest.episodes), "shards": len(result.manifest.shards)}
    _log(f"{split}: {record['episodes']} episodes in {record['shards']} shard(s)")
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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueryResult:
        retrieved = tuple(RetrievedDemo(**item) for item in data["retrieved"])
        return cls(**{**data, "retrieved": retrieved})


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


def _used(records: Mapping[str, StageRecord]) -> dict[str, Any]:
    """The settings the results were really made with, read from the stage records."""
    retrieve = records["retrieve"].settings
    return {
        "ranker": retrieve["ranker"],
        "top_k": retrieve["top_k"],
        "seed": retrieve["seed"],
        "sampling_steps": retrieve["sampling_steps"],
        "training_steps": records["train"].result["steps"],
        "seen_tasks": records["seen_demos"].settings["tasks"],
        "seen_episodes": records["seen_demos"].settings["episodes"],
        "unseen_tasks": records["unseen_demos"].settings["tasks"],
        "unseen_episodes": records["unseen_demos"].settings["episodes"],
    }


def format_summary(records: Mapping[str, StageRecord]) -> str:
    """The plain-text report: per unseen task and demo, the top-K seen demos with scores.

    Everything in it comes from what the stages recorded, never from the current flags,
    so it cannot claim a setting the results were not made with.
    """
    used = _used(records)
    results = [QueryResult.from_json(item) for item in records["retrieve"].result["retrievals"]]
    lines = [
        "agnostos demo: cross-task demo retrieval on minibench",
        f"ranker: {used['ranker']}, top-{used['top_k']}, seed {used['seed']}, "
        f"{used['training_steps']} training steps, {used['sampling_steps']} sampling steps",
        f"bank: {used['seen_episodes']} demo(s) of each of {len(used['seen_tasks'])} seen "
        f"tasks; queries: {used['unseen_episodes']} demo(s) of each of "
        f"{len(used['unseen_tasks'])} unseen tasks",
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
    if "eval" in records:
        from agnostos.demo_eval import format_eval_table
        from agnostos.demo_vla import format_vla_row

        vla = [format_vla_row(records["vla_eval"].result)] if "vla_eval" in records else []
        lines += [*format_eval_table(records["eval"].result, vla), ""]
    if "vla_train" in records:
        trained = records["vla_train"].result
        shown = ", ".join(f"{step} {value:.1f}%" if value is not None else f"{step} missing"
                          for step, value in sorted(trained["rollouts"].items(),
                                                    key=lambda item: int(item[0][5:])))  # fmt: skip
        lines += [f"VLA rollouts during training ({trained['rollout_task']} success): {shown}",
                  ""]  # fmt: skip
    ran = [f"{name} {record.seconds:.1f}" for name, record in records.items() if record.ran]
    reused = [name for name, record in records.items() if not record.ran]
    lines.append("stage seconds (this run): " + (", ".join(ran) or "none"))
    if reused:
        lines.append("re-used from an earlier run with the same settings: " + ", ".join(reused))
    return "\n".join(lines) + "\n"


def log_to_wandb(paths: DemoPaths, records: Mapping[str, StageRecord]) -> str | None:
    """One offline W&B run with the retrieval table (images included); returns its folder."""
    import wandb

    results = [QueryResult.from_json(item) for item in records["retrieve"].result["retrievals"]]
    run = wandb.init(
        project="agnostos-demo",
        name="retrieval",
        group=paths.root.resolve().name,
        job_type="retrieval",
        dir=str(paths.root),
        mode="offline",
        config={name: record.settings for name, record in records.items()},
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
        run.summary.update({f"seconds/{name}": rec.seconds for name, rec in records.items()})
        return str(run.dir)
    finally:
        run.finish()


def make_tiny_base(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    """Stage base: the tiny SD-shaped base, its autoencoder fitted to the seen front frames.

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
    """Stage train: `agnostos fit` with the tiny config on the seen shards.

    A run killed with the same settings resumes from its `last.ckpt`; with other settings
    the stage runner has already discarded the old training folder.
    """
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
    steps = int(export.name.split("-")[-1])
    return {"export": str(export), "base": str(paths.base), "steps": steps}


def _sampling(config: DemoConfig):
    from agnostos.models.dynamics_diffusion import SamplingConfig

    return SamplingConfig(num_inference_steps=config.sampling_steps)


def build_demo_bank(config: DemoConfig, paths: DemoPaths, trained: dict[str, Any]) -> dict:
    """Stage bank: the bank of seen demos, with demo text and predicted-future images."""
    from agnostos.evaluation.bank import BankBuildConfig, build_bank, load_model, model_resolution

    model, identity = load_model(trained["export"], base=trained["base"])
    build = BankBuildConfig(
        shards=str(paths.seen_shards), seed=config.seed, sampling=_sampling(config),
        resolution=model_resolution(model), suite="minibench", demo_text="required",
        save_images=True,
    )  # fmt: skip
    _log(f"building the demo bank from {paths.seen_shards} with {trained['export']}")
    result = build_bank(build, model, identity, paths.bank, progress=config.progress)
    if not result.complete:
        raise RuntimeError(f"{paths.bank}: the bank build stopped before the end")
    return {"demos": result.demos_done, "dir": str(paths.bank)}


def _first_and_last(episode) -> list[np.ndarray]:
    return [episode.rgb("front", 0), episode.rgb("front", episode.num_frames - 1)]


def retrieve(config: DemoConfig, paths: DemoPaths, trained: Mapping[str, Any]) -> dict:
    """Stage retrieve: rank the bank for every unseen demo and save its image strip.

    Two streaming passes keep memory flat: the unseen demos (features, ranking, their own
    frames), then the seen shards for just the frames of each query's best demo.
    """
    from agnostos.evaluation.bank import DemoBank, extract_features, load_model, model_resolution
    from agnostos.evaluation.rankers import RankingQuery, make_ranker
    from agnostos.images import prepare_rgb
    from agnostos.seeding import derive_seed
    from agnostos.shards.convert import shard_urls
    from agnostos.shards.reading import iter_episodes
    from agnostos.tasks import MINIBENCH

    model, _ = load_model(trained["export"], base=trained["base"])
    resolution = model_resolution(model)
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
        image = Path(paths.retrievals.name) / f"{episode.task}_episode{episode.episode}.png"
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
    return {"retrievals": [result.as_json() for result in results]}


def demo_stages(config: DemoConfig, paths: DemoPaths) -> list[Stage]:
    """The demo's stages in order, each with the settings its output depends on.

    Worker counts, progress bars and W&B logging change how a stage runs, not what it
    makes, so they are not part of any fingerprint.
    """
    from agnostos.demo_eval import evaluate_xicm
    from agnostos.demo_vla import VLA_CONFIG, evaluate_vla, train_vla
    from agnostos.models.tiny import TinySpec
    from agnostos.tasks import MINIBENCH

    sampling = {"seed": config.seed, "sampling_steps": config.sampling_steps}

    def trained(records: Mapping[str, StageRecord]) -> dict[str, Any]:
        return records["train"].result

    return [
        Stage("seen_demos", _demo_settings(config, "seen"), (), (paths.seen_demos,),
              lambda records: make_demos(config, paths.seen_demos, "seen")),
        Stage("unseen_demos", _demo_settings(config, "unseen"), (), (paths.unseen_demos,),
              lambda records: make_demos(config, paths.unseen_demos, "unseen")),
        Stage("seen_shards", {}, ("seen_demos",), (paths.seen_shards,),
              lambda records: make_shards(paths.seen_demos, paths.seen_shards, "seen")),
        Stage("unseen_shards", {}, ("unseen_demos",), (paths.unseen_shards,),
              lambda records: make_shards(paths.unseen_demos, paths.unseen_shards, "unseen")),
        Stage("base", {"spec": asdict(TinySpec(seed=config.seed)), "vae_steps": config.vae_steps},
              ("seen_shards",), (paths.base,),
              lambda records: make_tiny_base(config, paths)),
        Stage("train",
              {"config": _file_sha256(DYNAMICS_CONFIG), "train_steps": config.train_steps,
               "batch_size": config.batch_size, "learning_rate": config.learning_rate,
               "seed": config.seed},
              ("seen_shards", "base"), (paths.train,),
              lambda records: train_dynamics(config, paths)),
        Stage("bank", sampling, ("seen_shards", "train"), (paths.bank,),
              lambda records: build_demo_bank(config, paths, trained(records))),
        Stage("retrieve",
              {**sampling, "ranker": config.ranker, "top_k": config.top_k,
               "image_size": config.image_size},
              ("unseen_shards", "seen_shards", "train", "bank"), (paths.retrievals,),
              lambda records: retrieve(config, paths, trained(records))),
        Stage("eval",
              {"seed": config.seed, "top_k": config.eval_top_k, "image_size": config.image_size,
               "unseen_tasks": list(config.unseen_tasks or MINIBENCH.unseen),
               "episodes": config.eval_episodes, "max_steps": config.eval_max_steps,
               "llm": config.llm, "llm_decoding": config.llm_decoding,
               "llm_max_new_tokens": config.llm_max_new_tokens},
              ("train", "bank"), (paths.root / "eval", paths.root / "test"),
              lambda records: evaluate_xicm(config, paths.root, trained(records), paths.bank)),
        Stage("vla_train",
              {"config": _file_sha256(VLA_CONFIG), "steps": config.vla_steps,
               "batch_size": config.vla_batch_size, "seed": config.seed,
               "learning_rate": config.vla_learning_rate,
               "rollout_episodes": config.vla_rollout_episodes,
               "max_steps": config.eval_max_steps, "image_size": config.image_size},
              ("seen_shards",), (paths.root / "vla", paths.root / "test-seen"),
              lambda records: train_vla(config, paths.root, paths.seen_shards)),
        Stage("vla_eval",
              {"seed": config.seed, "image_size": config.image_size,
               "unseen_tasks": list(config.unseen_tasks or MINIBENCH.unseen),
               "episodes": config.eval_episodes, "max_steps": config.eval_max_steps},
              ("vla_train",), (paths.root / "eval" / "vla",),
              lambda records: evaluate_vla(config, paths.root, records["vla_train"].result)),
    ]  # fmt: skip


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_demo(config: DemoConfig) -> Path:
    """Run (or resume) every stage; returns the path of the text summary.

    A stage whose settings (or whose inputs) changed since it last finished runs again,
    and so does every stage after it that reads it; the rest are re-used.
    """
    paths = DemoPaths(Path(config.out))
    paths.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runner = StageRunner(paths.stages, log=_log)
    for stage in demo_stages(config, paths):
        runner.run(stage)
    records = runner.records
    summary = format_summary(records)
    atomic_write_bytes(paths.root / "summary.txt", summary.encode())
    atomic_write_json(
        paths.root / "summary.json",
        {
            "used": _used(records),
            "stages": {name: {**rec.as_json(), "ran": rec.ran} for name, rec in records.items()},
            "retrievals": records["retrieve"].result["retrievals"],
            "eval": records["eval"].result if "eval" in records else None,
            "vla": records["vla_eval"].result if "vla_eval" in records else None,
        },
    )
    if config.wandb:
        log_to_wandb(paths, records)
    sys.stdout.write(summary)
    _log(f"summary: {paths.root / 'summary.txt'}")
    return paths.root / "summary.txt"
