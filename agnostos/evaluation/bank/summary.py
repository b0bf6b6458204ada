"""`format_bank_info`: the human summary `agnostos bank info` prints.

Kept apart from the store because it is a report, not part of the file format: what a
reader checks before trusting a bank (demos per task, which model and sampling settings
made it, tensor shapes, demo-text coverage, and whether the BOS rows are one constant).
"""

from __future__ import annotations

from collections import Counter

from agnostos.evaluation.bank.records import IMAGES_DIR
from agnostos.evaluation.bank.store import DemoBank


def format_bank_info(bank: DemoBank) -> str:
    """A human summary: demos per task, model, sampling, tensors, demo-text coverage.

    It also reports whether the BOS rows are one constant vector, the check
    `xicm_method.md` recommends on the published bank (if so, X-ICM's "lang" term adds
    the same amount to every score).
    """
    lines = [f"demo bank: {len(bank)} demos, origin {bank.origin}, {bank.created_by}"]
    if bank.root is not None:
        lines[0] += f" ({bank.root})"
    tasks = Counter(bank.tasks)
    lines.append(f"tasks ({len(tasks)}): " + ", ".join(f"{t} {n}" for t, n in tasks.items()))
    if bank.model is not None:
        model = bank.model
        lines.append(f"model: {model.description}; base {model.base}; unet {model.unet}")
        lines.append(f"unet sha256: {model.unet_sha256}")
    if bank.extraction is not None:
        ex = bank.extraction
        sampling = ex.sampling
        lines.append(
            f"extraction: {ex.camera} camera frame {ex.frame} at {ex.resolution}px, "
            f"{sampling.num_inference_steps} steps, guidance {sampling.guidance_scale} / "
            f"image {sampling.image_guidance_scale}, seed {ex.seed} ({ex.seed_rule}), {ex.dtype}"
        )
    for name, tensor in bank.tensors().items():
        lines.append(f"  {name}: {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}")
    bos = bank.prompt_bos.reshape(len(bank), -1)
    constant = bool(len(bank)) and bool((bos == bos[:1]).all())
    lines.append(
        "prompt_bos: "
        + ("one constant vector (X-ICM's lang term is a constant)" if constant else "varies")
    )
    with_text = sum(record.demo_text is not None for record in bank.records)
    lines.append(f"demo text: {with_text}/{len(bank)} demos")
    reasons = Counter(record.demo_text_error for record in bank.records if record.demo_text is None)
    for reason, count in reasons.most_common(5):
        lines.append(f"  missing ({count}): {reason}")
    images = sum(record.image is not None for record in bank.records)
    if images:
        lines.append(f"images: {images} predicted frames under {IMAGES_DIR}/")
    return "\n".join(lines)
