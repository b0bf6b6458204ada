"""Agents the evaluator runs: the protocol (`base.py`), the reference agents replay and
noop (`baselines.py`), X-ICM (`xicm.py`, its reply parser in `xicm_reply.py`), a fine-tuned
VLA (`vla.py`) and your own policy by import path (`custom.py`).

In an evaluation config an agent is a class path with its arguments
(`agent: {class_path: agnostos.evaluation.agents.CustomAgent, init_args: {...}}`); the
shipped ones also go by their short names on the command line (`--agent replay`, `--agent
noop`, `--agent vla --agent.export DIR`).
"""

from agnostos.evaluation.agents.base import Agent, AgentError, EpisodeContext, QueuedAgent
from agnostos.evaluation.agents.baselines import NoopAgent, ReplayAgent
from agnostos.evaluation.agents.custom import CustomAgent, chunk_to_actions, load_class
from agnostos.evaluation.agents.vla import VLAAgent
from agnostos.evaluation.agents.xicm import LLMConfig, XICMAgent

# short names for `--agent NAME` and `agent: NAME`
AGENTS: dict[str, type[Agent]] = {
    "replay": ReplayAgent,
    "noop": NoopAgent,
    "custom": CustomAgent,
    "xicm": XICMAgent,
    "vla": VLAAgent,
}

__all__ = [
    "AGENTS",
    "Agent",
    "AgentError",
    "CustomAgent",
    "EpisodeContext",
    "LLMConfig",
    "NoopAgent",
    "QueuedAgent",
    "ReplayAgent",
    "VLAAgent",
    "XICMAgent",
    "chunk_to_actions",
    "load_class",
]
