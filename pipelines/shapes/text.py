"""The captions' vocabulary, a word-level tokenizer over it and a tiny T5-style text encoder, built in code."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from .data import COLOUR_NAMES, DIRECTIONS, SHAPES, image_caption, to_device, video_caption

MAX_TOKENS = 8
VOCABULARY = ("[PAD]", "[UNK]", "a", *COLOUR_NAMES, *SHAPES, "moving", *DIRECTIONS)
IMAGE_CAPTIONS = {image_caption(s, c): s * len(COLOUR_NAMES) + c for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES))}
VIDEO_CAPTIONS = tuple(
    video_caption(s, c, d) for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES)) for d in range(len(DIRECTIONS))
)


def normalise(caption: str) -> str:
    return " ".join(caption.lower().replace(".", " ").split())


def check_captions(prompt: str | list[str], known) -> list[str]:
    """The normalised captions of a prompt or list of prompts, or an error that says what the model knows."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a caption (str) or a list of them, got {prompt!r}")
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError(f"prompt must be a non-empty caption or a non-empty list of them, got {prompt!r}")
    normalised = [normalise(p) for p in prompts]
    unknown = [p for p, n in zip(prompts, normalised) if n not in known]
    if unknown:
        video = "moving" in next(iter(known))
        raise ValueError(
            f"prompt: caption(s) {unknown} are outside what this model knows. It knows captions of the form "
            f"'a <colour> <shape>{' moving <direction>' if video else ''}' with colours {list(COLOUR_NAMES)}, "
            f"shapes {list(SHAPES)}" + (f", directions {list(DIRECTIONS)}" if video else "")
        )
    return normalised


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", model_max_length=MAX_TOKENS)


def build_text_encoder(width: int = 64) -> UMT5EncoderModel:
    config = UMT5Config(vocab_size=len(VOCABULARY), d_model=width, d_kv=width // 2, d_ff=2 * width, num_layers=2,
                        num_heads=2, relative_attention_num_buckets=8, pad_token_id=0)
    return UMT5EncoderModel(config)


def embed_captions(tokenizer: PreTrainedTokenizerFast, text_encoder: UMT5EncoderModel, captions: list[str], device):
    """Text embeddings with the padding positions zeroed, as WanPipeline does (so "" is all zeros)."""
    tokens = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    ids, mask = to_device(tokens.input_ids, device), to_device(tokens.attention_mask, device)
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)
