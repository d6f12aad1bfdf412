"""VARPipeline: class-conditional images by next-scale prediction, scale by scale with a KV cache (the baseline).

Per scale k (coarse to fine): the transformer reads scale k's input (start tokens, or the upsampled reconstruction
f_hat of the scales drawn so far) beside the keys and values it cached for the coarser scales, CFG mixes the
conditional and null-class halves with VAR's ramp t = guidance_scale * k / (K - 1), top-k / top-p filter the logits,
a token is drawn per position, and its Phi-refined embedding is added to f_hat. The tokenizer decodes the final
f_hat. `use_kv_cache=False` recomputes the whole prefix at every scale under the block-causal mask instead (the
block-sparse kernel): the same logits, for checking the cache.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from ..checks import check_bool
from .sampling import (
    NextScalePipelineOutput, check_class_labels, check_sampling, draw_tokens, filter_logits, guided, to_output,
    with_null_class,
)
from .tokenizer import VARTokenizer
from .var_transformer import VARTransformer


class VARPipeline(DiffusionPipeline):
    """Components: `transformer` (VARTransformer) and `tokenizer` (VARTokenizer), with the same scales."""

    model_cpu_offload_seq = "transformer->tokenizer"

    def __init__(self, transformer: VARTransformer, tokenizer: VARTokenizer):
        super().__init__()
        tokenizer.check_scales_fit(type(self).__name__, transformer.layout.scales)
        self.register_modules(transformer=transformer, tokenizer=tokenizer)

    def check_inputs(self, class_labels, guidance_scale, top_k, top_p, generator, output_type, return_dict,
                     use_kv_cache) -> torch.Tensor:
        owner = type(self).__name__
        labels = check_class_labels(owner, class_labels, self.transformer.config.num_classes)
        check_sampling(owner, guidance_scale, top_k, top_p, generator, len(labels), output_type, return_dict)
        check_bool(owner, "use_kv_cache", use_kv_cache)
        return labels.to(self._execution_device)

    def _logits(self, k: int, cond: torch.Tensor, labels: torch.Tensor, f_hat: torch.Tensor, inputs: list,
                cache) -> torch.Tensor:
        """Scale k's logits for the CFG batch (2B, pn_k^2, V): from the cache, or from the whole prefix."""
        scale_input = None if k == 0 else self.tokenizer.scale_input(k, f_hat).repeat(2, 1, 1)
        if cache is not None:
            return self.transformer.scale_logits(k, cond, scale_input, cache)
        if scale_input is not None:
            inputs.append(scale_input)
        prefix = torch.cat(inputs, dim=1) if inputs else f_hat.new_zeros(len(labels), 0, f_hat.shape[1])
        return self.transformer(labels, prefix)[:, self.transformer.layout.span(k)]

    @torch.no_grad()
    def __call__(self, class_labels: int | list[int] | torch.Tensor, guidance_scale: float = 1.5, top_k: int = 900,
                 top_p: float = 0.96, generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "pil", return_dict: bool = True, use_kv_cache: bool = True):
        """One image per class label. guidance_scale: CFG at the last scale (ramped from 0 at the first); top_k,
        top_p: 0 turns each off. Returns `NextScalePipelineOutput` (images, token_indices), or that tuple."""
        labels = self.check_inputs(class_labels, guidance_scale, top_k, top_p, generator, output_type, return_dict,
                                   use_kv_cache)
        layout, n = self.transformer.layout, self.tokenizer.scales[-1]
        cfg_labels = with_null_class(labels, self.transformer.config.num_classes)
        cond = self.transformer.embeddings.condition(cfg_labels)
        f_hat = torch.zeros(len(labels), self.tokenizer.config.codebook_dim, n, n, device=labels.device,
                            dtype=self.tokenizer.dtype)
        cache = self.transformer.new_cache() if use_kv_cache else None
        inputs, token_indices = [], []
        with self.progress_bar(total=layout.num_scales) as progress_bar:
            for k in range(layout.num_scales):
                logits = self._logits(k, cond, cfg_labels, f_hat, inputs, cache)
                logits = filter_logits(guided(logits, layout.guidance_ramp(k, guidance_scale)), top_k, top_p)
                tokens = draw_tokens(logits, generator)
                f_hat = f_hat + self.tokenizer.upsampled_scale(k, tokens)
                token_indices.append(tokens)
                progress_bar.update()
        del cache  # the decoder's peak memory would come on top of the KV cache
        images = to_output(self.tokenizer.decode_latents(f_hat), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, token_indices
        return NextScalePipelineOutput(images=images, token_indices=token_indices)
