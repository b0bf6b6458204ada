"""Two-process DDP on CPU: real Lightning (`strategy="ddp"`, gloo) over real shards.

The test runs this file as a script: Lightning's DDP launcher starts the second rank by
re-running the script, which an in-process pytest run could not do cleanly. Each rank
records the sample ids it trained and validated on and writes them to a JSON file; the test
checks that training ranks drew disjoint shards and the same number of batches, and that
every validation sample was seen exactly once across the ranks, in each validation run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from agnostos.datamodules import DynamicsBatch, DynamicsDataModule
from agnostos.shards.convert import ConvertOptions, convert
from agnostos.shards.manifest import Manifest
from agnostos.shards.synthetic import write_synthetic_dataset

EPOCHS = 2
BATCH = 4
EPOCH_SAMPLES = 40


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_ids: list[list[str]] = []
        self.val_ids: list[list[str]] = []

    def on_train_epoch_start(self):
        self.train_ids.append([])

    def on_validation_epoch_start(self):
        self.val_ids.append([])

    def training_step(self, batch: DynamicsBatch, index: int):
        self.train_ids[-1] += batch.ids
        inputs, targets = batch.unit_range()
        return ((inputs - targets).mean() * self.weight - 1).pow(2)

    def validation_step(self, batch: DynamicsBatch, index: int):
        self.val_ids[-1] += batch.ids

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run_rank(shards: str, out: str) -> None:
    """What each DDP rank runs (rank 1 is started by Lightning re-running this script)."""
    module = DynamicsDataModule(
        shards=shards, input_frame="all", val_episodes_per_task=2, batch_size=BATCH,
        num_workers=2, shuffle_buffer=16, shuffle_initial=4, epoch_samples=EPOCH_SAMPLES,
        image_size=16, seed=7,
    )  # fmt: skip
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=module)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "train_batches": len(module.train_dataloader()),
        "train_ids": model.train_ids,
        "val_ids": model.val_ids,
        "weight": model.weight.item(),
    }
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_two_rank_ddp_draws_disjoint_shards_and_validates_each_sample_once(tmp_path):
    source, shards, out = tmp_path / "episodes", tmp_path / "shards", tmp_path / "out"
    write_synthetic_dataset(source, episodes_per_task=4)  # 8 episodes, 24 frames each
    convert(source, shards, ConvertOptions(shard_size=1), show_progress=False)  # 1 per shard
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, __file__, str(shards), str(out)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The epoch length is on the loader, not the IterableDataset: Lightning has no
    # "`IterableDataset` has `__len__` defined" warning for either rank.
    assert "__len__" not in result.stdout + result.stderr
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    manifest = Manifest.load(shards)
    shard_of = {e.key: s.name for s in manifest.shards for e in s.episodes}
    held = {f"{task}/all_variations/episode{n}" for task in ("pick_block", "push_block")
            for n in (2, 3)}  # fmt: skip

    # Training: same number of batches on both ranks, every epoch; disjoint shards.
    per_worker = math.ceil(math.ceil(EPOCH_SAMPLES / (2 * BATCH)) / 2)  # ceil(5 / 2) = 3
    for record in ranks:
        assert record["train_batches"] == 2 * per_worker
        assert [len(ids) for ids in record["train_ids"]] == [2 * per_worker * BATCH] * EPOCHS
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == EPOCHS * 2 * per_worker
    assert ranks[0]["weight"] == ranks[1]["weight"] != 0.0  # gradients were all-reduced
    drawn = [{shard_of[i.split("@")[0]] for ids in r["train_ids"] for i in ids} for r in ranks]
    assert drawn[0] and drawn[1] and not drawn[0] & drawn[1]
    assert not ({i.split("@")[0] for r in ranks for ids in r["train_ids"] for i in ids} & held)

    # Validation: each run covers every held-out pair exactly once across the two ranks.
    expected = sorted(f"{key}@{i}->23" for key in held for i in range(23))
    assert len(ranks[0]["val_ids"]) == len(ranks[1]["val_ids"]) == EPOCHS
    for run in range(EPOCHS):
        seen = ranks[0]["val_ids"][run] + ranks[1]["val_ids"][run]
        assert sorted(seen) == expected
        assert ranks[0]["val_ids"][run] and ranks[1]["val_ids"][run]


if __name__ == "__main__":
    run_rank(sys.argv[1], sys.argv[2])
