"""Rollouts during training (`RolloutEvaluation`) in real `Trainer.fit` runs on minibench.

The module's `rollout_agent` returns a deterministic agent (`rollouts_ddp.MixedAgent`) that
replays the stored episode or holds its pose (noop), so the logged success is known in
advance; the agent also draws from Python's, numpy's and torch's global generators, so a
callback that did not restore them would change the training stream. A two-process DDP run
(`rollouts_ddp.py` as a script, as test_datamodules_ddp.py runs itself) checks the gather:
each rank runs one of the two episodes, one that succeeds and one that fails, and both
ranks must log 50.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from rollouts_ddp import TASK, MixedAgent

from agnostos.evaluation.agents import NoopAgent
from agnostos.evaluation.records import read_records
from agnostos.evaluation.suites import SuiteConfig, SuiteError
from agnostos.evaluation.training_eval import (
    RolloutEvaluation,
    load_suite,
    metric_keys,
    rng_states,
)

pytestmark = pytest.mark.timeout(300)

TESTS = Path(__file__).resolve().parent


class Tiny(L.LightningModule):
    """Dropout and noise in every step (the RNG stream matters), a submodule kept in eval
    mode while training, and `rollout_agent` that misbehaves by switching to train mode."""

    def __init__(self, replay_at: dict[int, Sequence[int]] | None = None) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4)
        self.dropout = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(4, 1)
        self.replay_at = replay_at or {}
        self.modes_in_rollout: list[bool] = []
        self.train_modes: list[tuple[bool, ...]] = []

    def on_train_start(self) -> None:
        self.frozen.eval()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.train_modes.append(tuple(module.training for module in self.modules()))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        hidden = self.frozen(x) + torch.randn_like(x)
        return self.head(self.dropout(hidden)).pow(2).mean()

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.arange(64.0).reshape(16, 4) / 64)
        return torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)

    def val_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.zeros(2, 4))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def rollout_agent(self) -> MixedAgent:
        self.modes_in_rollout.append(self.training)
        self.train()  # the callback must put every module's mode back
        return MixedAgent(self.replay_at.get(self.global_step, ()))


class Probe(L.Callback):
    """Placed around RolloutEvaluation: `before` snapshots, `after` compares."""

    def __init__(self, role: str, shared: dict) -> None:
        self.role, self.shared = role, shared

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        modes = tuple(module.training for module in pl_module.modules())
        states = rng_states()
        if self.role == "before":
            self.shared["before"] = (modes, states)
            return
        before_modes, before_states = self.shared.pop("before")
        self.shared.setdefault("checks", []).append(
            (
                modes == before_modes,
                random.getstate() == before_states["python"],
                _same_numpy_state(states["numpy"], before_states["numpy"]),
                torch.equal(states["torch"], before_states["torch"]),
            )
        )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same_numpy_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def _suite(root: Path, **overrides) -> SuiteConfig:
    settings = dict(
        benchmark="minibench", split="seen", tasks=[TASK], episodes=2, max_steps=3,
        cameras=["front"], test_data=str(root), generate_missing=False,
    )  # fmt: skip
    settings.update(overrides)
    return SuiteConfig(**settings)


@pytest.fixture(scope="module")
def test_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("minibench_test")
    assert len(_suite(root, generate_missing=True).prepare_test_data(progress=False)) == 2
    return root


def _trainer(root: Path, callbacks: list, steps: int = 6, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root, max_steps=steps, val_check_interval=2,
        check_val_every_n_epoch=None, limit_val_batches=1, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
        callbacks=callbacks, **kwargs,
    )  # fmt: skip


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_fit_logs_eval_success_keeps_the_best_checkpoint_and_changes_no_rng_or_mode(
    test_data: Path, tmp_path: Path
) -> None:
    replay_at = {2: (), 4: (0, 1), 6: (0,)}  # 0%, 100%, 50%
    shared: dict = {}
    rollouts = RolloutEvaluation(_suite(test_data), workers=2, videos_per_task=0)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="eval/success", mode="max", save_top_k=1,
        filename="{step}",
    )  # fmt: skip
    L.seed_everything(3, verbose=False)
    module = Tiny(replay_at)
    callbacks = [Probe("before", shared), rollouts, Probe("after", shared), checkpoint]
    _trainer(tmp_path / "with", callbacks, logger=False).fit(module)
    after_with = (_draws(), [p.detach().clone() for p in module.parameters()])

    assert {step: m["eval/success"] for step, m in rollouts.history.items()} == {
        2: 0.0, 4: 100.0, 6: 50.0,
    }  # fmt: skip
    assert list(rollouts.history[6]) == metric_keys(rollouts.last_plan)
    assert rollouts.history[6][f"eval/{TASK}/success"] == 50.0
    assert rollouts.history[6]["eval/episodes"] == 2.0
    assert math.isclose(float(module.trainer.callback_metrics["eval/success"]), 50.0)
    assert checkpoint.best_model_score == 100.0
    assert Path(checkpoint.best_model_path).name == "step=4.ckpt"
    for step in (2, 4, 6):  # one folder per evaluation, every key recorded once
        folder = tmp_path / "with" / "rollouts" / f"step-{step}"
        assert sorted(r.episode for r in read_records(folder)) == [0, 1]

    # Inside rollout_agent the module was in eval mode (Lightning's validation switch);
    # after the callback every mode and every generator was back as it was before it.
    assert module.modes_in_rollout == [False, False, False]
    assert shared["checks"] == [(True, True, True, True)] * 3
    first = module.train_modes[0]
    assert first[1] is False and first[0] is True  # frozen in eval, the module training
    assert all(modes == first for modes in module.train_modes)

    # The same run without rollouts: the same weights and the same draws afterwards.
    L.seed_everything(3, verbose=False)
    plain = Tiny(replay_at)
    _trainer(tmp_path / "without", [], logger=False, enable_checkpointing=False).fit(plain)
    after_without = (_draws(), list(plain.parameters()))
    assert after_with[0] == after_without[0]
    assert all(torch.equal(a, b) for a, b in zip(after_with[1], after_without[1], strict=True))


class TinyVLA(L.LightningModule):
    """LoRA steps of the tiny VLA on noise batches; rollouts through `VLAAgent.from_policy`."""

    def __init__(self, base: Path) -> None:
        super().__init__()
        from agnostos.action_codecs import XICMActionCodec
        from agnostos.models.vla import VLAInputs, VLAPolicy

        inputs = VLAInputs(cameras=("front",), image_size=32)
        self.policy = VLAPolicy.from_base(base, codec=XICMActionCodec(), inputs=inputs)
        self.policy.apply_lora(r=4, alpha=8, dropout=0.1)
        self.policy.train()  # from_pretrained leaves the backbone in eval mode

    def training_step(self, batch, batch_idx):
        import types

        (x,) = batch
        rows = len(x)
        fake = types.SimpleNamespace(
            images=torch.randint(0, 256, (rows, 1, 3, 32, 32), dtype=torch.uint8),
            cameras=["front"], proprio=torch.rand(rows, 8), instructions=["reach"] * rows,
            actions=torch.full((rows, 1, 7), 40), action_mask=torch.ones(rows, 1, dtype=bool),
        )  # fmt: skip
        return self.policy(**self.policy.training_inputs(fake)).loss

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), 2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), 2)

    def rollout_agent(self):
        from agnostos.evaluation.agents import VLAAgent

        return VLAAgent.from_policy(self.policy, step=self.global_step, max_new_tokens=4)


def test_a_tiny_vla_trains_on_after_rollouts_of_its_live_policy(
    test_data: Path, tmp_path: Path
) -> None:
    """Rollouts run the live LoRA model under inference mode on the runner's thread;
    training then goes on with the same weights (no inference tensor reaches autograd)."""
    from agnostos.models.tiny_vla import build_tiny_vla

    module = TinyVLA(build_tiny_vla(tmp_path / "tiny"))
    modes = [submodule.training for submodule in module.modules()]
    rollouts = RolloutEvaluation(_suite(test_data, episodes=1), workers=1, videos_per_task=0)
    trainer = _trainer(tmp_path, [rollouts], steps=4, logger=False, enable_checkpointing=False)
    trainer.fit(module)
    assert trainer.global_step == 4 and sorted(rollouts.history) == [2, 4]
    [record] = rollouts.last_records
    assert record.status == "error" and record.error_type == "AgentError"  # 4 tokens: no keyframe
    assert record.agent_stats["model_calls"] == 1
    assert rollouts.history[4]["eval/episodes"] == 1.0
    assert [submodule.training for submodule in module.modules()] == modes  # all training


def test_wandb_logger_gets_the_table_and_videos(test_data: Path, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="agnostos-test", save_dir=str(tmp_path), offline=True)
    rollouts = RolloutEvaluation(_suite(test_data, episodes=1), workers=1, videos_per_task=1)
    _trainer(tmp_path, [rollouts], steps=2, logger=logger).fit(Tiny({2: (0,)}))
    logger.experiment.finish()
    assert rollouts.history[2]["eval/success"] == 100.0
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    media = {path.name.split("_")[0] for path in (run_dir / "files" / "media").rglob("*.*")}
    assert any(path.suffix == ".mp4" for path in (run_dir / "files" / "media").rglob("*"))
    assert media  # the episode table and the video were written into the training run
    assert list((run_dir / "files" / "media" / "table" / "eval").glob("episodes_table*"))


def test_a_module_without_rollout_agent_is_refused_before_training(
    test_data: Path, tmp_path: Path
) -> None:
    class NoHook(Tiny):
        rollout_agent = None

    rollouts = RolloutEvaluation(_suite(test_data))
    with pytest.raises(TypeError, match="rollout_agent"):
        _trainer(tmp_path, [rollouts], logger=False).fit(NoHook())


def test_suites_by_name_file_and_fields(tmp_path: Path) -> None:
    assert load_suite("minibench_seen") == SuiteConfig(benchmark="minibench", split="seen")
    assert load_suite("minibench").split == "unseen"
    repo = Path(__file__).resolve().parents[1]
    unseen = load_suite(str(repo / "configs" / "eval" / "minibench_unseen.yaml"))
    assert unseen.benchmark == "minibench" and unseen.split == "unseen"
    bare = tmp_path / "suite.yaml"
    bare.write_text("benchmark: minibench\nsplit: seen\nepisodes: 3\n")
    assert load_suite(str(bare)).episodes == 3
    callback = RolloutEvaluation(str(bare), tasks=[TASK], episodes=1, max_steps=4)
    assert (callback.suite.tasks, callback.suite.episodes, callback.suite.max_steps) == (
        [TASK], 1, 4,
    )  # fmt: skip
    with pytest.raises(SuiteError, match="neither a suite YAML file nor a suite name"):
        load_suite("minibench_sideways")
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite:\n  benchmark: minibench\n  episode: 3\n")
    with pytest.raises(SuiteError, match="unknown suite key"):
        load_suite(str(bad))


def test_metric_keys_follow_the_plan_levels() -> None:
    from agnostos.evaluation.runner import plan_run

    unseen = SuiteConfig(benchmark="minibench", tasks=["stack_blocks", "knock_over_bottle"])
    keys = metric_keys(plan_run(unseen, NoopAgent()))
    assert keys[:3] == ["eval/success", "eval/success_level1", "eval/success_level2"]
    one_level = SuiteConfig(benchmark="minibench", tasks=["stack_blocks"])
    assert "eval/success_level2" not in metric_keys(plan_run(one_level, NoopAgent()))
    seen = metric_keys(plan_run(SuiteConfig(benchmark="minibench", split="seen"), NoopAgent()))
    assert not [key for key in seen if key.startswith("eval/success_")]


# -- two ranks --------------------------------------------------------------------------------


def test_two_rank_ddp_runs_each_episode_once_and_logs_the_same_success(tmp_path: Path) -> None:
    test_data, root = tmp_path / "test_data", tmp_path / "run"  # generated by rank 0
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, str(TESTS / "rollouts_ddp.py"), str(test_data), str(root)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "self.log('eval/" not in result.stderr  # no advice to sync identical values
    ranks = [json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Rank 0 ran episode 0 (replayed: success), rank 1 episode 1 (held: failure).
    folder = root / "rollouts" / "step-2"
    shards = [read_records(folder / f"episodes-{i}-of-2.jsonl") for i in (0, 1)]
    assert [[r.episode for r in shard] for shard in shards] == [[0], [1]]
    assert [[r.success for r in shard] for shard in shards] == [[True], [False]]
    for record in ranks:
        assert record["history"]["2"]["eval/success"] == 50.0
        assert record["logged"]["eval/success"] == 50.0
        assert record["best"] == 50.0
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["logged"] == ranks[1]["logged"]
