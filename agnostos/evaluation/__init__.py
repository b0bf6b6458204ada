"""Evaluation: X-ICM's demo text and retrieval, and the rollout evaluator with its scores.

Retrieval (the observation and demo text X-ICM's prompt shows is `agnostos.observation_text`,
top level because the datamodules feed the same text to VLAs):
- `bank/`: the demo bank (features of every seen demo), built from shards, and X-ICM's
  published pickle;
- `rankers.py`: how the bank is ranked for a query (X-ICM's `lang_vis_out`, cosine, random).

Rollouts (docs/evaluation.md):
- `suites.py`: which stored test episodes a suite runs, on which simulator;
- `agents/`: the agent protocol, the replay and noop references, custom policies, X-ICM
  and fine-tuned VLAs;
- `runner.py` and `worker.py`: environment worker processes driven by one batched agent;
- `records.py`: one JSON line per finished episode, and the run plan;
- `callbacks.py` and `reporters.py`: the runner's events; progress, videos, W&B;
- `video.py`: mp4 encoding; `scores.py`, `scores_cli.py`: the AGNOSTOS table;
- `cli.py`: `agnostos eval`;
- `training_eval.py`: the evaluator as a Lightning callback, rollouts during training.
"""
