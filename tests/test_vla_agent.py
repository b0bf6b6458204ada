"""The VLA agent on minibench with a tiny Qwen2.5-VL-shaped backbone (`build_tiny_vla`).

- An export (`save_export`) of a LoRA adapter fitted in seconds to answer the stored
  episode's starting pose (a reachable keyframe) runs through the spawned-worker runner,
  as `VLAAgent(export=...)` and through `agnostos eval --agent vla` and its config.
- A live policy (`VLAAgent.from_policy`) runs a chunk of two keyframes per call in order,
  in inference and eval mode, and is left in its own modes, on its device.
- The object-coordinate text of the live scene reaches the prompt, and a reply without a
  keyframe ends the episode as an agent error.
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from agnostos.action_codecs import XICMActionCodec
from agnostos.evaluation.agents import AGENTS, VLAAgent
from agnostos.evaluation.records import read_records
from agnostos.evaluation.runner import Runner, RunnerConfig
from agnostos.evaluation.suites import SuiteConfig, episode_folder

pytestmark = pytest.mark.timeout(300)

TASK = "reach_target"
CAMERAS = ("front", "wrist")
CODEC = XICMActionCodec()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _suite(root: Path, **overrides) -> SuiteConfig:
    settings = dict(
        benchmark="minibench", split="seen", tasks=[TASK], episodes=1, max_steps=3,
        cameras=list(CAMERAS), test_data=str(root), generate_missing=False,
    )  # fmt: skip
    settings.update(overrides)
    return SuiteConfig(**settings)


@pytest.fixture(scope="module")
def test_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("minibench_test")
    assert len(_suite(root, episodes=2, generate_missing=True).prepare_test_data(progress=False))
    return root


@pytest.fixture(scope="module")
def scene(test_data: Path) -> types.SimpleNamespace:
    """Episode 0's first frame: its images, instruction, pose, and X-ICM's 7-integer code of
    that pose (a keyframe that is reachable: the gripper is there)."""
    from agnostos.images import centre_crop_resize
    from agnostos.observation_text import episode_observation_text
    from agnostos.shards.folders import read_episode
    from agnostos.tasks import get_suite

    folder = episode_folder(test_data, TASK, 0)
    episode = read_episode(folder, cameras=CAMERAS, check_frames=False)
    pose = np.asarray(episode.low_dim.gripper_pose[0], dtype=np.float64)
    gripper = float(episode.low_dim.gripper_open[0])
    images = np.stack(  # as a keyframe datamodule with image_size 64 decodes them
        [centre_crop_resize(episode.rgb(camera, 0), 64).transpose(2, 0, 1) for camera in CAMERAS]
    )
    names = get_suite("minibench").object_names[TASK]
    text = episode_observation_text(
        episode, 0, object_names=names, cameras=CAMERAS, instruction=episode.instruction
    )
    return types.SimpleNamespace(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        instruction=episode.instruction,
        proprio=torch.tensor([*pose, gripper], dtype=torch.float32),
        code=CODEC.encode(np.concatenate([pose, [gripper, 1.0]])[None])[0],
        object_text=text,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agnostos.models.tiny_vla import build_tiny_vla

    return build_tiny_vla(tmp_path_factory.mktemp("tiny_vla") / "qwen")


def _batch(scene: types.SimpleNamespace, step: int, chunk: int, rows: int = 4):
    """The scene's first frame with pixel and pose noise, answered by the scene's code."""
    generator = torch.Generator().manual_seed(step)
    noise = torch.randint(-12, 13, (rows, *scene.images.shape), generator=generator)
    return types.SimpleNamespace(
        images=(scene.images.int() + noise).clamp(0, 255).to(torch.uint8),
        cameras=list(CAMERAS),
        proprio=scene.proprio + 0.01 * torch.randn(rows, 8, generator=generator),
        instructions=[scene.instruction] * rows,
        actions=torch.as_tensor(np.tile(scene.code, (rows, chunk, 1))),
        action_mask=torch.ones(rows, chunk, dtype=torch.bool),
    )


def _answers(policy, scene: types.SimpleNamespace, chunk: int) -> bool:
    probe = _batch(scene, 10_000, chunk)
    prediction = policy.predict(probe.images, probe.instructions, probe.proprio)
    expected = np.tile(CODEC.decode(scene.code[None])[0], (chunk, 1))
    return bool(prediction.valid.all()) and np.allclose(prediction.actions, expected)


def _fitted(base: Path, scene: types.SimpleNamespace, chunk: int = 1):
    """A LoRA policy fitted in seconds to answer `chunk` copies of the scene's pose code to
    the scene's first frame (and noisy copies of it): until it does, at most 400 steps."""
    from agnostos.models.vla import VLAInputs, VLAPolicy

    torch.manual_seed(0)
    inputs = VLAInputs(cameras=CAMERAS, image_size=64, chunk=chunk)
    policy = VLAPolicy.from_base(base, codec=CODEC, inputs=inputs)
    policy.apply_lora(r=8, alpha=16)
    optimiser = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for step in range(400):
        if step % 50 == 0 and step and _answers(policy, scene, chunk):
            break
        policy.train()
        loss = policy(**policy.training_inputs(_batch(scene, step, chunk))).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    assert _answers(policy, scene, chunk), "the tiny VLA did not learn its one answer"
    return policy


@pytest.fixture(scope="module")
def export(base: Path, scene, tmp_path_factory: pytest.TempPathFactory) -> Path:
    policy = _fitted(base, scene)
    return policy.save_export(tmp_path_factory.mktemp("export") / "step-80", {"title": "test"})


def test_vla_agent_from_an_export_runs_a_minibench_episode(
    export: Path, test_data: Path, scene, tmp_path: Path
) -> None:
    agent = VLAAgent(export=str(export))
    settings = agent.settings()
    assert (
        settings["vla_json_sha256"]
        == hashlib.sha256((export / "vla.json").read_bytes()).hexdigest()
    )
    assert settings["export"] == str(export.resolve()) and settings["max_new_tokens"] is None
    assert settings["image_size"] == 64  # the policy's, by default
    assert VLAAgent(export=str(export), max_new_tokens=20).settings() != settings
    [record] = Runner(_suite(test_data), agent, tmp_path / "run", RunnerConfig(workers=1)).run()
    assert record.status == "ok", record.error_message
    assert record.steps == 3  # holding the start pose never reaches the target
    expected = CODEC.decode(scene.code[None])[0]
    assert np.allclose(record.actions, [expected] * 3)
    stats = record.agent_stats
    assert stats["model_calls"] == 3 and stats["parse_failures"] == 0
    assert stats["keyframes"] == 3 and stats["invalid_keyframes"] == 0
    assert agent.policy is None  # close() released the model it loaded


def test_live_policy_runs_its_chunks_in_order_and_keeps_its_modes(
    base: Path, test_data: Path, scene, tmp_path: Path
) -> None:
    """A chunk of two keyframes per call, queued in order. The policy really generates (in
    inference and eval mode, checked), and its reply is then replaced by two distinct
    keyframes, the start pose and the pose 1 cm higher, so the order shows in the actions."""
    from agnostos.models.vla import VLAInputs, VLAPolicy, VLAPrediction

    inputs = VLAInputs(cameras=CAMERAS, image_size=64, chunk=2)
    policy = VLAPolicy.from_base(base, codec=CODEC, inputs=inputs)
    policy.apply_lora(r=4, alpha=8)
    policy.train()
    policy.model.base_model.model.lm_head.eval()  # a submodule in its own mode
    modes = [module.training for module in policy.modules()]
    higher = scene.code + np.array([0, 0, 1, 0, 0, 0, 0])
    chunk = CODEC.decode(np.stack([scene.code, higher]))
    seen: list[tuple[bool, bool]] = []
    predict = policy.predict

    def scripted(images, instructions, proprio=None, object_texts=None, max_new_tokens=None):
        seen.append((torch.is_inference_mode_enabled(), policy.training))
        real = predict(images, instructions, proprio, object_texts, max_new_tokens)
        rows = len(instructions)
        return VLAPrediction(
            np.tile(chunk, (rows, 1, 1)), np.ones((rows, 2), bool), real.texts, [True] * rows
        )

    policy.predict = scripted
    agent = VLAAgent.from_policy(policy, step=7)
    assert agent.settings()["step"] == 7 and agent.settings()["policy"] == "live"
    [record] = Runner(_suite(test_data), agent, tmp_path / "run", RunnerConfig(workers=1)).run()
    assert record.status == "ok", record.error_message
    # 3 steps take 2 calls: keyframes 1, 2 of the first chunk, then 1 of the second
    assert record.agent_stats["model_calls"] == 2 and record.agent_stats["keyframes"] == 4
    assert np.allclose(record.actions, [chunk[0], chunk[1], chunk[0]])
    assert seen == [(True, False)] * 2  # inference mode and eval mode in every call
    assert [module.training for module in policy.modules()] == modes  # each put back
    assert agent.policy is policy and policy.device.type == "cpu"  # a live model stays


def test_object_text_reaches_the_prompt_and_a_reply_without_keyframe_is_an_error(
    base: Path, test_data: Path, scene, tmp_path: Path
) -> None:
    from agnostos.models.vla import VLAInputs, VLAPolicy

    inputs = VLAInputs(cameras=CAMERAS, image_size=64, object_text=True)
    policy = VLAPolicy.from_base(base, codec=CODEC, inputs=inputs)
    texts: list[list[str]] = []
    predict = policy.predict

    def watched(images, instructions, proprio=None, object_texts=None, max_new_tokens=None):
        texts.append(list(object_texts))
        return predict(images, instructions, proprio, object_texts, max_new_tokens)

    policy.predict = watched
    # two tokens cannot hold a keyframe: the reply parses to nothing
    agent = VLAAgent.from_policy(
        policy, max_new_tokens=2, object_names="minibench", object_text_cameras=list(CAMERAS)
    )
    [failed] = Runner(_suite(test_data), agent, tmp_path / "run", RunnerConfig(workers=1)).run()
    assert texts == [[scene.object_text]]  # the live scene's text is the stored frame's
    assert failed.status == "error" and failed.error_type == "AgentError"
    assert "no valid keyframe" in failed.error_message
    stats = failed.agent_stats
    assert stats["model_calls"] == 1 and stats["parse_failures"] == 1
    assert stats["keyframes"] == 0 and len(stats["failed_replies"]) == 1


def test_agnostos_eval_runs_the_vla_agent_by_short_name_and_from_its_config(
    export: Path, test_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agnostos.cli import main

    assert AGENTS["vla"] is VLAAgent
    suite = [
        "--suite.split", "seen", "--suite.tasks", f"[{TASK}]", "--suite.episodes", "1",
        "--suite.max_steps", "1", "--suite.test_data", str(test_data),
        "--runner.workers", "1", "--report.progress", "false", "--report.wandb", "false",
        "--report.videos_per_task", "0",
    ]  # fmt: skip
    config = Path(__file__).resolve().parents[1] / "configs/eval/minibench_vla_unseen.yaml"
    runs = {
        "short": ["--suite.benchmark", "minibench", "--suite.cameras", "[front, wrist]",
                  "--agent", "vla", "--agent.export", str(export)],
        "config": ["--config", str(config), "--agent.export", str(export.parent)],
    }  # fmt: skip
    for name, args in runs.items():
        out = tmp_path / name
        status = main(["eval", *args, *suite, "--out", str(out)])
        assert status == 0, capsys.readouterr().err
        [record] = read_records(out)
        assert record.status == "ok" and record.agent_stats["model_calls"] == 1
    plans = [json.loads((tmp_path / name / "run.json").read_text()) for name in runs]
    assert {plan["config"]["agent_settings"]["export"] for plan in plans} == {str(export.resolve())}


def test_a_folder_of_exports_means_its_latest_and_a_bad_folder_one_clear_error(
    export: Path, tmp_path: Path
) -> None:
    from agnostos.evaluation.agents.vla import resolve_export

    assert resolve_export(export.parent) == export  # <run>/export/ -> its step-<N>/
    with pytest.raises(FileNotFoundError, match="is not a VLA export"):
        VLAAgent(export=str(tmp_path))
