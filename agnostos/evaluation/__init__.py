"""Evaluation: X-ICM's demo text, the demo bank and its rankers.

- `observation_text.py`: observations and demos as the text X-ICM's prompt shows;
- `bank/`: the demo bank (features of every seen demo), built from shards, and X-ICM's
  published pickle;
- `rankers.py`: how the bank is ranked for a query (X-ICM's `lang_vis_out`, cosine, random).
"""
