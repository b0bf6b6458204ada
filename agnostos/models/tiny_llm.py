"""A tiny chat LLM built from a config, for CPU tests of everything that talks to an LLM.

A random-weight `Qwen2ForCausalLM` (about 100k parameters) with a byte-level BPE tokenizer
trained on a few X-ICM-shaped strings and a ChatML template, saved as a normal model
directory, so the transformers backend loads it through exactly the path it uses for a real
model. Nothing downloads. Its replies are noise; with constrained decoding they are still
valid action lists, which is what tests of the agent need.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "TRAINING_TEXT", "build_tiny_llm", "byte_level_bpe"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format of Qwen2.5 and SmolLM2's templates.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = (
    "['instruction': push the maroon button, {'button': [47, 52, 77]}]>"
    "[[47, 52, 83, 0, 36, 0, 1], [47, 52, 77, 0, 36, 0, 0]], ",
    "['instruction': open the top drawer, {'drawer': [60, 40, 78], 'handle': [61, 38, 80]}]>"
    "[[57, 49, 87, 0, 39, 0, 1], [61, 38, 80, 71, 70, 10, 0]], ",
    "You are a Franka Panda robot with a parallel gripper. Output a list of 7-dim actions.",
    "system user assistant 0 1 2 3 4 5 6 7 8 9 10 19 28 37 46 55 64 73 82 91 99",
)


def byte_level_bpe(
    texts: tuple[str, ...] | list[str],
    vocab_size: int,
    special_tokens: list[str] | tuple[str, ...] = tuple(SPECIAL_TOKENS),
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    chat_template: str | None = CHAT_TEMPLATE,
):
    """A byte-level BPE tokenizer trained offline on `texts` (well under a second).

    The special tokens take the first ids, in the order given; the trainer stops early when
    the texts have no more pairs to merge, so the vocabulary can end up below `vocab_size`.
    Shared by the tiny chat LLM here and the tiny VLAs of `tiny_vla.py`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llm(
    directory: str | Path,
    seed: int = 0,
    vocab_size: int = 400,
    context_length: int = 8192,
    hidden_size: int = 64,
    padded_vocab: int = 0,
    logit_scale: float = 1.0,
    texts: tuple[str, ...] = TRAINING_TEXT,
) -> Path:
    """Write a tiny random chat model (model + tokenizer) to `directory`; returns it.

    `context_length` is its `max_position_embeddings` (small to test overlong prompts);
    `padded_vocab` extra rows in the output head, as real models pad theirs (grammar
    engines must cope); `logit_scale` sharpens the random head so sampled rows differ.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(directory)
    tokenizer = byte_level_bpe(texts, vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + padded_vocab, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=context_length,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
