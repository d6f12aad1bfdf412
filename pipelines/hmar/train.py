"""Train a small VAR and the HMAR it starts from on the shapes data, in three stages. Seeded, resumable, progress bar;
checkpoints and exports written atomically, safetensors only.

    python -m accel.pipelines.hmar.train tokenizer --out runs/tokenizer
    python -m accel.pipelines.hmar.train var       --out runs/var  --init runs/tokenizer/model
    python -m accel.pipelines.hmar.train hmar      --out runs/hmar --init runs/var/model
    [--steps N] [--batch-size B] [--lr LR] [--seed S] [--device cpu|cuda] [--max-minutes M] [--no-resume]

The data is `accel.pipelines.shapes.data.image_batch(seed, step, ...)`: 32x32 images of 4 shapes in 6 colours,
class-conditional on the 24 (shape, colour) pairs: class = shape * 6 + colour (`shapes.models.NUM_CLASSES`, the
order of `shapes.data.SHAPES` and `COLOURS`), the convention of the shipped shapes-image model.

- `tokenizer`: a VARTokenizer (TOKENIZER_CONFIG: 4x down to 8x8 features, token maps of sides SCALES), trained on
  pixel MSE plus VAR's multi-scale residual VQ loss (`VARTokenizer.forward`). Export: OUT/model, its folder.
- `var`: a VARTransformer (TRANSFORMER_CONFIG) on the frozen tokenizer's token pyramids, teacher-forced next-scale
  cross-entropy (`training.next_scale_loss`). `--init`: the tokenizer's folder. Export: a VARPipeline folder.
- `hmar`: an HMARTransformer of the same shape started from the VAR's weights (HMAR starts from VAR: its base and
  next-scale blocks are VAR's blocks in order, `hmar_from_var`); first next-scale training under the block-diagonal
  mask for `next_scale_steps` steps, then the mask branch alone, copied from the next-scale branch
  (`training.start_mask_branch_from_next_scale`, `masked_prediction_loss`), for the remaining steps (a resumed run
  given more --steps refines longer). `--init`: the VARPipeline folder.
  Export: an HMARPipeline folder carrying MASK_SCHEDULE as its default (HMAR's own is for VAR's scales).

Every step's batch, class dropout and mask draws are functions of (seed, step), so a run resumed from
OUT/checkpoint.safetensors (the default when it exists) ends as an uninterrupted run would. On the CPU everything
runs in float32 (the segment masks through the PyTorch path); on CUDA the transformers run under bf16 autocast, so
the block-sparse kernel computes the masks, while the tokenizer always encodes in float32 (tokens must not depend on
rounding). Exports are float16 (half the size; load them with dtype=torch.float32 on a CPU). The result: OUT/model
and OUT/training.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from ..shapes.data import COLOURS, image_batch, image_caption
from ..shapes.models import NUM_CLASSES
# The other trainers' conventions: step seeds, atomic folder replacement, one-file safetensors checkpoints.
from ..shapes.train import _replace_folder, _step_seed
from ..streaming_t2v.train import _write_json, load_checkpoint, save_checkpoint
from .hmar_transformer import HMARTransformer
from .pipeline_hmar import HMARPipeline
from .pipeline_var import VARPipeline
from .tokenizer import VARTokenizer
from .training import (
    mask_branch_parameters, masked_prediction_loss, next_scale_loss, start_mask_branch_from_next_scale, training_step,
)
from .var_transformer import VARTransformer

SCALES = (1, 2, 3, 4, 6, 8)  # 130 tokens; the last is the 8x8 feature map of a 32x32 image
# Narrow at full resolution, where the convolutions cost most on a CPU: widths 16, 32, 64 at 32, 16 and 8 pixels.
TOKENIZER_CONFIG = dict(vocab_size=512, codebook_dim=8, scales=SCALES, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                        norm_num_groups=8)
TRANSFORMER_CONFIG = dict(num_classes=NUM_CLASSES, depth=4, width=128, num_heads=4, scales=SCALES)
HMAR_BRANCH_DEPTH = 2  # HMAR: 2 base blocks shared by the next-scale and mask branches of 2 blocks each
# Tokens kept per refinement step, per scale (HMARPipeline's mask_schedule): like HMAR's own schedule, the coarse
# scales, where shape and colour are decided, are drafted and then re-predicted in steps; the fine ones in one go.
MASK_SCHEDULE = ((1,), (1, 3), (1, 2, 6), (4, 4, 8), (36,), (64,))
# On the development machine's shared CPU (one thread, OMP_NUM_THREADS=1), 2026-12-06: 25, 17 and 8 minutes. The
# tokenizer needs its 2000 steps: in a trial at a constant lr the shapes classifier read the right shape in 43% of its
# reconstructions after 600 steps, 96% after 2000 (the shipped run, with the schedule below: 99%).
DEFAULTS = {
    "tokenizer": dict(steps=2000, batch_size=32, lr=2e-3),
    "var": dict(steps=1000, batch_size=32, lr=2e-3),
    "hmar": dict(steps=600, batch_size=32, lr=1e-3, next_scale_steps=400),
}
COMMITMENT = 0.25  # VAR's beta
COND_DROP_RATE = 0.1  # VAR's class dropout, which CFG needs
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    stage: str
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    max_minutes: float | None = None  # stop early (checkpointed and exported) when the wall-clock budget is spent
    init: str | None = None  # var: the tokenizer's folder; hmar: the VARPipeline folder
    next_scale_steps: int | None = None  # hmar: the steps before the mask branch's fine-tuning (the rest)
    ema_decay: float = 0.999
    log_every: int = 25
    checkpoint_every: int = 100


def class_labels(batch) -> torch.Tensor:
    """The 24 classes: shape-major, class = shape * 6 + colour."""
    return batch.shape * len(COLOURS) + batch.colour


# Each class's name: shapes-image's caption of it ("a red circle"), in class order (what `accel-eval` takes as the
# prompts of shapes-var and shapes-hmar).
CLASS_NAMES = tuple(image_caption(c // len(COLOURS), c % len(COLOURS)) for c in range(NUM_CLASSES))


# Stages: the trained module, the loss of a step, phases (HMAR), the export ------------------------------------------

class Stage:
    """One phase by default: every step trains every parameter."""

    def masked(self, step: int) -> bool:
        return False

    def trained_parameters(self, model, step: int) -> list[torch.nn.Parameter]:
        return list(model.parameters())


class TokenizerStage(Stage):
    def __init__(self, cfg: TrainConfig, device):
        self.cfg, self.device = cfg, device
        self.module = VARTokenizer(**TOKENIZER_CONFIG).to(device)
        self._start_codebook()

    @torch.no_grad()
    def _start_codebook(self) -> None:
        """Codes drawn from the untrained encoder's features of one batch (index -1: no training step's). The default
        N(0, 1) codes have norms near 2.8 against the features' 0.6: on 64 images 48 of 512 codes are ever nearest,
        against 315 this way, and a code never nearest never learns."""
        tokenizer = self.module
        images = image_batch(self.cfg.seed, -1, 64, device=self.device).pixels
        features = tokenizer.quant_conv(tokenizer.encoder(images)).permute(0, 2, 3, 1).flatten(0, 2)
        pick = torch.randint(len(features), (tokenizer.config.vocab_size,),
                             generator=torch.Generator().manual_seed(self.cfg.seed))
        tokenizer.codebook.weight.copy_(features[pick.to(self.device)])

    def loss(self, model, step: int, generator) -> torch.Tensor:
        pixels = image_batch(self.cfg.seed, step, self.cfg.batch_size, device=self.device).pixels
        reconstruction, vq_loss = model(pixels, commitment=COMMITMENT)
        return F.mse_loss(reconstruction, pixels) + vq_loss

    def export(self, ema, folder: str) -> None:
        shippable(ema).save_pretrained(folder)


class VARStage(Stage):
    pipeline = VARPipeline

    def __init__(self, cfg: TrainConfig, device):
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(cfg.init).to(device)
        self.module = VARTransformer(vocab_size=self.tokenizer.config.vocab_size,
                                     codebook_dim=self.tokenizer.config.codebook_dim, **TRANSFORMER_CONFIG).to(device)

    def tokens(self, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        batch = image_batch(self.cfg.seed, step, self.cfg.batch_size, device=self.device)
        return self.tokenizer.encode(batch.pixels), class_labels(batch)

    def loss(self, model, step: int, generator) -> torch.Tensor:
        indices, labels = self.tokens(step)
        with autocast(self.device):
            return next_scale_loss(model, self.tokenizer, indices, labels, COND_DROP_RATE, generator)

    def export(self, ema, folder: str) -> None:
        self.pipeline(transformer=shippable(ema), tokenizer=shippable(self.tokenizer)).save_pretrained(folder)


class HMARStage(VARStage):
    pipeline = HMARPipeline

    def __init__(self, cfg: TrainConfig, device):
        self.cfg, self.device = cfg, device
        if not os.path.isfile(os.path.join(cfg.init, "model_index.json")):
            raise ValueError(f"--init must be the var stage's export (a VARPipeline folder), got {cfg.init!r}")
        var = VARPipeline.from_pretrained(cfg.init, dtype=torch.float32)
        self.tokenizer = var.tokenizer.to(device).eval().requires_grad_(False)
        self.module = hmar_from_var(var.transformer, HMAR_BRANCH_DEPTH).to(device)

    def masked(self, step: int) -> bool:
        return step >= self.cfg.next_scale_steps

    def loss(self, model, step: int, generator) -> torch.Tensor:
        if not self.masked(step):
            return super().loss(model, step, generator)
        indices, labels = self.tokens(step)
        with autocast(self.device):
            return masked_prediction_loss(model, self.tokenizer, indices, labels, None, COND_DROP_RATE, generator)

    def export(self, ema, folder: str) -> None:
        # The schedule goes into model_index.json: the folder then samples with it, no argument needed.
        self.pipeline(transformer=shippable(ema), tokenizer=shippable(self.tokenizer),
                      mask_schedule=MASK_SCHEDULE).save_pretrained(folder)

    def trained_parameters(self, model, step: int) -> list[torch.nn.Parameter]:
        """Next-scale steps train everything; masked steps the mask branch alone (the rest frozen, as HMAR does)."""
        params = mask_branch_parameters(model) if self.masked(step) else list(model.parameters())
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        return params


def init_config(module) -> dict:
    """A diffusers model's constructor arguments, without the bookkeeping (`_name_or_path`: where it was loaded from)."""
    return {k: v for k, v in module.config.items() if not k.startswith("_")}


def shippable(module):
    """A float16 CPU copy of a diffusers model, built from its constructor arguments alone: a model loaded from a
    folder would write that folder's path into the exported config."""
    fresh = type(module).from_config(init_config(module))
    fresh.load_state_dict(module.state_dict())
    return fresh.half().eval()


def autocast(device):
    """bf16 autocast on CUDA, so the segment masks run through the block-sparse kernel; float32 elsewhere."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", torch.bfloat16)


def load_tokenizer(folder: str | None) -> VARTokenizer:
    """A frozen VARTokenizer from its own folder or a pipeline folder holding one in tokenizer/."""
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"--init must be the tokenizer stage's export (OUT/model of `tokenizer`), got {folder!r}")
    sub = "tokenizer" if os.path.isfile(os.path.join(folder, "tokenizer", "config.json")) else None
    tokenizer = VARTokenizer.from_pretrained(folder, subfolder=sub, dtype=torch.float32)
    return tokenizer.eval().requires_grad_(False)


def hmar_from_var(var: VARTransformer, branch_depth: int) -> HMARTransformer:
    """An HMARTransformer of VAR's shape holding VAR's weights: VAR's blocks in order become the base blocks, then
    the next-scale blocks; VAR's head the next-scale head; the token embedding's bias HMAR's shared bias. The mask
    branch and mask embedding keep their initialisation (the mask branch is copied from the next-scale one later)."""
    hmar = HMARTransformer(**init_config(var), branch_depth=branch_depth)
    base = var.config.depth - branch_depth
    renamed = {}
    for key, value in var.state_dict().items():
        if key.startswith("blocks."):
            i, rest = key[len("blocks."):].split(".", 1)
            i = int(i)
            key = f"base_blocks.{i}.{rest}" if i < base else f"next_scale_blocks.{i - base}.{rest}"
        elif key.startswith("head."):
            key = "next_scale_" + key
        elif key == "token_embed.bias":
            key = "token_embed_bias"
        renamed[key] = value
    missing, unexpected = hmar.load_state_dict(renamed, strict=False)
    fresh = [k for k in missing if not k.startswith(("mask_blocks.", "mask_head.", "mask_embedding."))]
    if fresh or unexpected:
        raise ValueError(f"VAR's weights do not fit the HMAR: missing {fresh}, unexpected {unexpected}")
    return hmar


STAGES = {"tokenizer": TokenizerStage, "var": VARStage, "hmar": HMARStage}


# The loop ------------------------------------------------------------------------------------------------------------

def _check(cfg: TrainConfig) -> None:
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {cfg.stage!r}")
    for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if (cfg.stage == "hmar") != (cfg.next_scale_steps is not None):
        raise ValueError(f"next_scale_steps is for the hmar stage (and needed there), got {cfg.next_scale_steps!r} "
                         f"for {cfg.stage!r}")
    if cfg.stage == "hmar" and not 0 <= cfg.next_scale_steps <= cfg.steps:
        raise ValueError(f"next_scale_steps must be in [0, steps={cfg.steps}], got {cfg.next_scale_steps}")
    if (cfg.stage == "tokenizer") != (cfg.init is None):
        raise ValueError("--init is the tokenizer's folder for `var`, the VAR pipeline's for `hmar`, and none for "
                         f"`tokenizer`; got {cfg.init!r} for {cfg.stage!r}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over the first 5% of the steps, then a cosine from lr down to lr / 10 at the last step: a
    function of the step alone, so a resumed run follows it (one given more steps stretches what is left of it)."""
    warmup = max(1, cfg.steps // 20)
    return cfg.lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(step / cfg.steps, 1.0)))


def _optimizer(params, cfg: TrainConfig, device) -> torch.optim.AdamW:
    fused = True if torch.device(device).type == "cuda" else None  # one kernel for the update: small steps on a GPU
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)


def _export(stage, ema, out: str) -> None:
    tmp = os.path.join(out, "model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stage.export(ema, tmp)
    _replace_folder(tmp, os.path.join(out, "model"))


def _start_mask_phase(stage, model, ema, cfg: TrainConfig, device):
    """HMAR's switch to masked refinement: both copies start the mask branch from the next-scale one, and a fresh
    optimizer takes the mask branch alone."""
    for m in (model, ema):
        start_mask_branch_from_next_scale(m)
    return _optimizer(stage.trained_parameters(model, cfg.next_scale_steps), cfg, device)


def _saved_step(path: str) -> int:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["state"])["step"]


def train(cfg: TrainConfig, out: str, device: str = "cpu", resume: bool = True) -> dict:
    """Runs (or resumes) the stage `cfg` describes into `out`. Returns the training record (OUT/training.json)."""
    _check(cfg)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    stage = STAGES[cfg.stage](cfg, device)
    model = stage.module.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ckpt = os.path.join(out, CHECKPOINT)
    resuming = resume and os.path.exists(ckpt)
    step, losses, elapsed = _saved_step(ckpt) if resuming else 0, [], 0.0
    # The optimizer of the phase the saved step ran in: a checkpoint taken as masked refinement begins holds the
    # next-scale optimizer, and the switch below happens on resuming.
    opt = _optimizer(stage.trained_parameters(model, max(step - 1, 0)), cfg, device)
    if resuming:
        step, losses, elapsed = load_checkpoint(ckpt, cfg, model, ema, opt, device)
    start, window = time.perf_counter() - elapsed, []
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes is not None else float("inf")
    with tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.stage}", mininterval=10) as bar:
        while step < cfg.steps and time.perf_counter() < deadline:
            if stage.masked(step) and not stage.masked(step - 1):
                opt = _start_mask_phase(stage, model, ema, cfg, device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            generator = torch.Generator().manual_seed(_step_seed(cfg, step))
            loss = training_step(lambda: stage.loss(model, step, generator), opt)
            with torch.no_grad():  # EMA with warm-up: short runs are not averaged towards their init
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
            step += 1
            window.append(loss)
            if step % cfg.log_every == 0 or step == cfg.steps:
                losses.append([step, sum(window) / len(window)])
                window = []
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt, cfg, model, ema, opt, step, losses, time.perf_counter() - start)
            bar.update()
    if window:  # stopped between two logged steps: the last steps' loss still counts
        losses.append([step, sum(window) / len(window)])
    if step < cfg.steps:  # out of time: keep what was learned, resumable later
        save_checkpoint(ckpt, cfg, model, ema, opt, step, losses, time.perf_counter() - start)
    _export(stage, ema, out)
    on_gpu = torch.device(device).type == "cuda"
    report = {"config": asdict(cfg), "steps_done": step, "device": str(device), "wall_s": time.perf_counter() - start,
              "losses": losses, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "gpu": torch.cuda.get_device_name() if on_gpu else None, "threads": torch.get_num_threads()}
    _write_json(os.path.join(out, "training.json"), report)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the shapes VAR / HMAR stages (resumable).")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--out", required=True)
    p.add_argument("--init", help="var: the tokenizer stage's OUT/model; hmar: the var stage's OUT/model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--next-scale-steps", type=int, help="hmar: steps of next-scale training before the mask branch's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, help="stop (checkpointed, exported) after this much wall time")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue OUT's checkpoint when there is one (the default)")
    args = p.parse_args(argv)
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "next_scale_steps": args.next_scale_steps}
    settings = {**DEFAULTS[args.stage], **{k: v for k, v in given.items() if v is not None}}
    try:
        cfg = TrainConfig(stage=args.stage, seed=args.seed, max_minutes=args.max_minutes, init=args.init, **settings)
        report = train(cfg, args.out, args.device, resume=args.resume)
    except (ValueError, TypeError) as err:  # bad options or a folder of another run: a message, not a traceback
        p.exit(2, f"{p.prog}: error: {err}\n")
    final = report["losses"][-1][1] if report["losses"] else float("nan")
    print(f"{cfg.stage}: {report['steps_done']} of {cfg.steps} steps in {report['wall_s']:.0f} s, final loss "
          f"{final:.4f} -> {args.out}/model")


if __name__ == "__main__":
    main()
