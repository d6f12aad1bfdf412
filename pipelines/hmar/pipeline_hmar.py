"""HMARPipeline: class-conditional images by Markovian next-scale prediction with masked refinement, no KV cache.

Per scale k: the transformer reads scale k's input alone (the upsampled reconstruction f_hat of the scales drawn so
far: nothing else is attended to, so nothing is cached), CFG with VAR's ramp, top-k / top-p, and a first draft of
all pn_k^2 tokens. The mask schedule then says how many tokens each step keeps: schedule[k] = [c_0, c_1, ...] keeps
the c_0 most confident drafted tokens, hides the rest, and each further step re-predicts the hidden ones with the
mask branch and keeps c_i more (the most confident), until all are kept. [pn_k^2] means no refinement. The schedule
is a sampling setting, not a weight: a pipeline carries its default in its config (`mask_schedule`, saved in
model_index.json, so a model trained for other scales than VAR's samples right when loaded), and a call may pass
another, no retraining.

The mask branch's CFG is `mask_guidance_scale` (HMAR's release uses ~0: 1e-6 x cfg); at 0 only the conditional
half runs.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from ..checks import check_real
from .hmar_transformer import HMARTransformer
from .sampling import (
    NextScalePipelineOutput, check_class_labels, check_sampling, draw_tokens, filter_logits, guided, to_output,
    token_probabilities, with_null_class,
)
from .scales import VAR_SCALES
from .tokenizer import VARTokenizer

HMAR_MASK_SCHEDULE = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))


def check_mask_schedule(owner: str, schedule, scales: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """One list of positive token counts per scale, summing to that scale's token count; None: HMAR's schedule, which
    exists for VAR's scales only."""
    if schedule is None:
        if tuple(scales) != VAR_SCALES:
            raise ValueError(f"{owner}: HMAR's default mask schedule is for scales {list(VAR_SCALES)}; for scales "
                             f"{list(scales)} pass mask_schedule (e.g. [[n * n] for n in scales]: no refinement), "
                             f"per call or to the pipeline (HMARPipeline(..., mask_schedule=...): saved with it)")
        return HMAR_MASK_SCHEDULE
    if not isinstance(schedule, (list, tuple)) or len(schedule) != len(scales):
        raise ValueError(f"{owner}: mask_schedule must hold one list per scale ({len(scales)}), got {schedule!r}")
    for k, (counts, pn) in enumerate(zip(schedule, scales)):
        if (not isinstance(counts, (list, tuple)) or not counts
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts)):
            raise ValueError(f"{owner}: mask_schedule[{k}] must be a non-empty list of positive ints, got {counts!r}")
        if sum(counts) != pn * pn:
            raise ValueError(f"{owner}: mask_schedule[{k}] = {list(counts)} sums to {sum(counts)}, but scale {k} "
                             f"({pn}x{pn}) has {pn * pn} tokens")
    return tuple(tuple(counts) for counts in schedule)


def least_confident(confidence: torch.Tensor, count: int) -> torch.Tensor:
    """Positions (B, count) of the `count` smallest confidences per row."""
    return confidence.argsort(dim=-1)[:, :count]


class HMARPipeline(DiffusionPipeline):
    """Components: `transformer` (HMARTransformer) and `tokenizer` (VARTokenizer), with the same scales.

    mask_schedule: the default of every call (see the module's docstring); None: HMAR's, for VAR's scales. Kept in the
    pipeline's config, diffusers' place for a pipeline's own settings (as SDXL's `force_zeros_for_empty_prompt`), so
    `save_pretrained` writes it to model_index.json and `from_pretrained` reads it back; folders saved before it
    existed load with None."""

    model_cpu_offload_seq = "transformer->tokenizer"

    def __init__(self, transformer: HMARTransformer, tokenizer: VARTokenizer,
                 mask_schedule: list[list[int]] | tuple[tuple[int, ...], ...] | None = None):
        super().__init__()
        owner = type(self).__name__
        tokenizer.check_scales_fit(owner, transformer.layout.scales)
        self.register_modules(transformer=transformer, tokenizer=tokenizer)
        if mask_schedule is not None:  # a bad schedule fails at loading, not at the first call
            mask_schedule = [list(c) for c in check_mask_schedule(owner, mask_schedule, transformer.layout.scales)]
        self.register_to_config(mask_schedule=mask_schedule)

    def check_inputs(self, class_labels, guidance_scale, mask_guidance_scale, top_k, top_p, mask_schedule, generator,
                     output_type, return_dict):
        owner = type(self).__name__
        labels = check_class_labels(owner, class_labels, self.transformer.config.num_classes)
        check_sampling(owner, guidance_scale, top_k, top_p, generator, len(labels), output_type, return_dict)
        check_real(owner, "mask_guidance_scale", mask_guidance_scale, minimum=0.0)
        if mask_schedule is None:  # the pipeline's own; checked again, as `register_to_config` may have replaced it
            mask_schedule = self.config.mask_schedule
        schedule = check_mask_schedule(owner, mask_schedule, self.transformer.layout.scales)
        return labels.to(self._execution_device), schedule

    def _masked_logits(self, k, cond, scale_input, tokens, hidden, mask_guidance_scale) -> torch.Tensor:
        """The mask branch's logits (B, pn_k^2, V) for the drafted tokens with `hidden` positions masked."""
        token_input = self.tokenizer.scale_input(k, self.tokenizer.upsampled_scale(k, tokens))
        masked = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, hidden, True)
        if mask_guidance_scale == 0:
            half = len(tokens)
            return self.transformer.masked_scale_logits(k, cond[:half], scale_input, token_input, masked)
        doubled = [torch.cat([t, t]) for t in (scale_input, token_input, masked)]  # the null-class half sees the same
        return guided(self.transformer.masked_scale_logits(k, cond, *doubled), mask_guidance_scale)

    def _refine(self, k, cond, scale_input, tokens, confidence, counts, mask_guidance_scale, top_k, top_p, generator):
        """Re-predict the least confident drafted tokens of scale k, keeping counts[i] more at step i."""
        hidden = least_confident(confidence, sum(counts[1:]))
        for step in range(1, len(counts)):
            logits = self._masked_logits(k, cond, scale_input, tokens, hidden, mask_guidance_scale)
            logits = filter_logits(logits, top_k, top_p)
            redrawn = draw_tokens(logits, generator)
            tokens = tokens.scatter(1, hidden, redrawn.gather(1, hidden))
            still_hidden = sum(counts[step + 1:])
            if still_hidden:
                hidden_confidence = token_probabilities(logits, tokens).gather(1, hidden)
                hidden = hidden.gather(1, least_confident(hidden_confidence, still_hidden))
        return tokens

    @torch.no_grad()
    def __call__(self, class_labels: int | list[int] | torch.Tensor, guidance_scale: float = 1.5, top_k: int = 900,
                 top_p: float = 0.96, mask_schedule: list[list[int]] | None = None, mask_guidance_scale: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """One image per class label. guidance_scale: next-scale CFG at the last scale (ramped from 0); top_k, top_p:
        0 turns each off; mask_schedule: tokens kept per refinement step per scale (default: the pipeline's
        `config.mask_schedule`, else HMAR's, for VAR's scales). Returns `NextScalePipelineOutput` (images,
        token_indices), or that tuple."""
        labels, schedule = self.check_inputs(class_labels, guidance_scale, mask_guidance_scale, top_k, top_p,
                                             mask_schedule, generator, output_type, return_dict)
        layout, n = self.transformer.layout, self.tokenizer.scales[-1]
        cond = self.transformer.embeddings.condition(with_null_class(labels, self.transformer.config.num_classes))
        f_hat = torch.zeros(len(labels), self.tokenizer.config.codebook_dim, n, n, device=labels.device,
                            dtype=self.tokenizer.dtype)
        token_indices = []
        with self.progress_bar(total=sum(len(counts) for counts in schedule)) as progress_bar:
            for k in range(layout.num_scales):
                scale_input = None if k == 0 else self.tokenizer.scale_input(k, f_hat)
                logits = self.transformer.scale_logits(k, cond, None if k == 0 else scale_input.repeat(2, 1, 1))
                logits = filter_logits(guided(logits, layout.guidance_ramp(k, guidance_scale)), top_k, top_p)
                tokens = draw_tokens(logits, generator)
                if len(schedule[k]) > 1:
                    confidence = token_probabilities(logits, tokens)
                    tokens = self._refine(k, cond, scale_input, tokens, confidence, schedule[k], mask_guidance_scale,
                                          top_k, top_p, generator)
                f_hat = f_hat + self.tokenizer.upsampled_scale(k, tokens)
                token_indices.append(tokens)
                progress_bar.update(len(schedule[k]))
        images = to_output(self.tokenizer.decode_latents(f_hat), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, token_indices
        return NextScalePipelineOutput(images=images, token_indices=token_indices)
