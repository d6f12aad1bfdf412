"""Train the shapes reference models: seeded, reproducible, resumable.

    python -m accel.pipelines.shapes.train image      --out runs/shapes-image      [--steps N] [--max-minutes 9] [--device cuda]
    python -m accel.pipelines.shapes.train video      --out runs/shapes-video      [...]
    python -m accel.pipelines.shapes.train classifier --out runs/shapes-classifier [...]
    python -m accel.pipelines.shapes.train long-video --out runs/shapes-long-video [...]

Every step's batch and noise are functions of (seed, step), so a run resumed from its checkpoint
(`--resume`, the default when OUT/checkpoint exists) continues exactly as if never stopped. Checkpoints and
the final model are written atomically. The result is a `save_pretrained` folder plus `training.json`
(config, steps, wall time, loss per logged step).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, fields

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import image_batch, video_batch
from .long_video import CHUNK_FRAMES, ShapesLongVideoPipeline, long_video_transformer
from .models import ShapesClassifier, image_transformer, video_transformer, with_positions
from .pipelines import ShapesImagePipeline, ShapesVideoPipeline
from .text import build_text_encoder, build_tokenizer, embed_captions

logger = logging.getLogger("accel")
LONG_CHUNKS = 4  # chunks per long-video training clip (16 frames)
# Long-video clips: the share cut from the start of a path, and in those the share of the loss on the first chunk.
# That chunk is denoised with no memory: it alone must follow the caption (later chunks can copy their memory), so
# at an even weighting, 1/8 of the loss, the model barely learnt the caption's colour and shape.
FROM_PATH_START, FIRST_CHUNK_SHARE = 0.75, 0.5
HIGH_NOISE = 0.9  # the lower end of the noise levels that `high_noise_share` trains on


@dataclass
class TrainConfig:
    kind: str
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    max_minutes: float | None = None  # stop early (checkpointed and exported) when the wall-clock budget is spent
    init: str | None = None  # start from this saved model's weights (a save_pretrained folder) instead of random ones
    compile: bool = False  # torch.compile the network: fuses the elementwise work that bounds these small models
    # The share of each batch drawn instead at t ~ U(HIGH_NOISE, 1), where x_t barely shows the sample and the caption
    # alone decides it: the video's direction word pays only there (the shapes-video card), where logit-normal draws
    # at mean 0 fall for 1.4% of samples. A share of the batch, not a shifted mean, keeps training at low noise too.
    high_noise_share: float = 0.0
    # Video: train on clips whose shapes draw a motion trail (`video_batch(trail=True)`), which breaks the data's
    # symmetry in time (the shapes-video card).
    motion_trail: bool = False
    ema_decay: float = 0.999
    log_every: int = 50
    checkpoint_every: int = 500


DEFAULTS = {
    "image": dict(steps=6000, batch_size=128, lr=3e-4),
    "video": dict(steps=20000, batch_size=128, lr=4e-4),
    "classifier": dict(steps=2000, batch_size=128, lr=1e-3),
    "long-video": dict(steps=20000, batch_size=128, lr=4e-4),
}


class _VideoModel(torch.nn.Module):
    """Text encoder and transformer trained together (caption dropout teaches the unconditional branch)."""

    def __init__(self, transformer=video_transformer):
        super().__init__()
        self.text_encoder = build_text_encoder()
        self.transformer = transformer(self.text_encoder.config.d_model)
        self.tokenizer = build_tokenizer()

    def embed(self, captions: list[str], drop: torch.Tensor, device) -> torch.Tensor:
        hidden = embed_captions(self.tokenizer, self.text_encoder, captions, device)
        return hidden * (~drop).view(-1, 1, 1).to(hidden.dtype)


def build(kind: str) -> torch.nn.Module:
    if kind == "long-video":
        return _VideoModel(long_video_transformer)
    return {"image": image_transformer, "video": _VideoModel, "classifier": ShapesClassifier}[kind]()


def _initialise(model: torch.nn.Module, kind: str, folder: str) -> None:
    """Load the weights of an earlier exported model (continued training; the optimizer starts afresh)."""
    # (attribute of the training model, or "" for the model itself) -> (subfolder, weights file) of the export
    parts = {
        "image": {"": ("transformer", "diffusion_pytorch_model.safetensors")},
        "classifier": {"": (".", "diffusion_pytorch_model.safetensors")},
    }.get(kind, {"transformer": ("transformer", "diffusion_pytorch_model.safetensors"),
                 "text_encoder": ("text_encoder", "model.safetensors")})
    for attr, (sub, file) in parts.items():
        module = getattr(model, attr) if attr else model
        path = os.path.join(folder, sub, file)
        if not os.path.isfile(path):
            raise ValueError(f"{folder} does not fit a {kind} model: it has no {os.path.join(sub, file)}")
        weights = _widen_patch_embedding(load_file(path), module.state_dict())
        result = module.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        state = module.state_dict()
        loaded = {state[k].data_ptr() for k in weights if k in state}
        untied = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]  # tied copies are loaded
        if untied or result.unexpected_keys:
            raise ValueError(f"{folder}/{sub} does not fit a {kind} model: missing {untied}, unexpected {result.unexpected_keys}")


def _widen_patch_embedding(weights: dict, state: dict) -> dict:
    """An export whose patch embedding reads fewer input channels than the model's (a video model from before some
    of its position channels): the new channels start at zero weight, so the model starts out as the export."""
    key = "patch_embedding.weight"
    if key not in weights or key not in state or weights[key].shape[1] >= state[key].shape[1]:
        return weights
    old = weights[key]
    logger.info("%s reads %d input channels, the model %d: the new ones start at zero", key, old.shape[1], state[key].shape[1])
    wide = torch.zeros(state[key].shape, dtype=old.dtype)
    wide[:, : old.shape[1]] = old
    return {**weights, key: wide}


def training_record(folder: str) -> dict | None:
    """The `training.json` of an exported model: inside its folder (shipped weights) or beside it (a run's OUT/model);
    None when there is none."""
    paths = [os.path.join(folder, "training.json"), os.path.join(os.path.dirname(os.path.normpath(folder)), "training.json")]
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def _init_training(folder: str | None) -> dict | None:
    """The training record of the model a run started from, so a card can state the whole history."""
    if not folder:
        return None
    record = training_record(folder)
    if record is None:
        logger.warning("no training.json in or beside %s: this run's record starts at its own step 0", folder)
        return None
    return {k: record.get(k) for k in ("config", "steps_done", "wall_s", "gpu", "init_training")}


def _step_seed(cfg: TrainConfig, step: int, stream: int = 0) -> int:
    """Seeds of a step's random draws, distinct for every (seed, step, stream) as the data's batches are."""
    return ((cfg.seed * 1_000_003 + step) * 4 + stream) % 2**63


def _noised(x0: torch.Tensor, g: torch.Generator,
            high_noise_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target): x_t = (1 - t) x0 + t noise, t logit-normal around 1/2 (or, for a share of the samples,
    uniform in [HIGH_NOISE, 1)), target velocity noise - x0."""
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=g, device=x0.device))
    if high_noise_share:  # no draws at 0: runs from before the option go on exactly as they ran
        high = torch.rand(x0.shape[0], generator=g, device=x0.device) < high_noise_share
        t = torch.where(high, HIGH_NOISE + (1 - HIGH_NOISE) * torch.rand(x0.shape[0], generator=g, device=x0.device), t)
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise, t, noise - x0


def _flow_matching_loss(model, kind: str, step: int, cfg: TrainConfig, device) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; the model predicts the velocity noise - x0 (diffusers' FlowMatch convention)."""
    if kind == "image":
        batch = image_batch(cfg.seed, step, cfg.batch_size, device=device)
    else:
        batch = video_batch(cfg.seed, step, cfg.batch_size, trail=cfg.motion_trail, device=device)
    g = torch.Generator(device=device).manual_seed(_step_seed(cfg, step))
    xt, t, target = _noised(batch.pixels, g, cfg.high_noise_share)
    if kind == "image":
        labels = batch.shape * 6 + batch.colour  # DiT's label embedding drops 10% to the null class in train mode
        pred = model(xt, timestep=t * 1000, class_labels=labels).sample
    else:
        drop = torch.rand(xt.shape[0], generator=g, device=device) < 0.1
        text = model.embed(batch.captions, drop, device)
        pred = model.transformer(with_positions(model.transformer, xt), timestep=t * 1000,
                                 encoder_hidden_states=text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, target)


def _long_video_loss(model, step: int, cfg: TrainConfig, device) -> torch.Tensor:
    """As the long pipeline generates: each chunk denoised against the memory of the clean chunks before it
    (written by a t=0 pass), with gradients through the memory. RoPE positions start at a random frame, since long
    videos run far past the training clips' length. A quarter of the clips are cut from later in the path (where
    shapes bounce): their first chunk is context only, since the caption says how a path starts, not how it goes on.
    In the others, the first chunk (no memory: the caption alone) weighs FIRST_CHUNK_SHARE of the loss.

    A chunk's noisy pass and the clean pass that writes it to memory read the same memory, so they run as one call
    on a doubled batch (noisy rows, then clean rows), of which the memory keeps the clean rows: fewer, larger calls
    for a step whose time is mostly the host's launching kernels."""
    rng = torch.Generator().manual_seed(_step_seed(cfg, step, stream=1))
    start = 0 if torch.rand(1, generator=rng) < FROM_PATH_START else int(torch.randint(CHUNK_FRAMES, 12 * CHUNK_FRAMES, (1,), generator=rng))
    batch = video_batch(cfg.seed, step, cfg.batch_size, frames=LONG_CHUNKS * CHUNK_FRAMES, start=start, device=device)
    g = torch.Generator(device=device).manual_seed(_step_seed(cfg, step))
    drop = torch.rand(cfg.batch_size, generator=g, device=device) < 0.1
    text = model.embed(batch.captions, drop, device)
    memory = model.transformer.new_memory(track_gradients=True)
    memory.frames = int(torch.randint(0, 256, (1,), generator=rng))
    b = cfg.batch_size
    zero = torch.zeros(b, device=device)
    rows = torch.arange(b, device=device)
    losses = []
    for i, chunk in enumerate(batch.pixels.split(CHUNK_FRAMES, dim=2)):
        denoise, write = i > 0 or start == 0, i + 1 < LONG_CHUNKS
        if denoise:
            xt, t, target = _noised(chunk, g, cfg.high_noise_share)
        if denoise and write:
            pred = model.transformer(torch.cat([xt, chunk]), torch.cat([text, text]), torch.cat([t * 1000, zero]),
                                     memory=memory, write_memory=True, return_dict=False)[0][:b]
            memory.reindex(torch.cat([rows, rows]) + b)  # the clean rows' memory, for both halves of the next call
        elif denoise:  # the last chunk: nothing left to remember
            memory.reindex(rows)
            pred = model.transformer(xt, text, t * 1000, memory=memory, return_dict=False)[0]
        else:  # a context-only first chunk
            model.transformer(chunk, text, zero, memory=memory, write_memory=True, return_dict=False)
            memory.reindex(torch.cat([rows, rows]))
        if denoise:
            losses.append(torch.nn.functional.mse_loss(pred, target))
    return _weigh_chunk_losses(losses, start)


def _weigh_chunk_losses(losses: list[torch.Tensor], start: int) -> torch.Tensor:
    if start > 0:  # no chunk without memory
        return torch.stack(losses).mean()
    return FIRST_CHUNK_SHARE * losses[0] + (1 - FIRST_CHUNK_SHARE) * torch.stack(losses[1:]).mean()


def _classifier_loss(model, step: int, cfg: TrainConfig, device) -> torch.Tensor:
    images = image_batch(cfg.seed, step, cfg.batch_size, device=device)
    videos = video_batch(cfg.seed, step, cfg.batch_size // 4, device=device)
    return model.loss(model.classify_images(images.pixels), images) + model.loss(model.classify_videos(videos.pixels), videos)


def _replace_folder(tmp: str, folder: str) -> None:
    """Put the complete folder `tmp` in place of `folder`. The old one moves aside first and goes only once the new
    one is in place: a kill at any point leaves `folder` or `folder.old` whole (`_existing` finds either)."""
    old = folder + ".old"
    if os.path.exists(folder):  # else `old` may be the only whole copy left by an earlier stop: keep it until replaced
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _existing(folder: str) -> str | None:
    """The folder, or the one `_replace_folder` had moved aside when it was stopped; None when neither exists."""
    return next((f for f in (folder, folder + ".old") if os.path.exists(os.path.join(f, "state.json"))), None)


def _save_atomic(tensors: dict, meta: dict, folder: str) -> None:
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "state.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(meta, f)
    _replace_folder(tmp, folder)


# What a resumed run may change: how long it goes on. Anything else would silently train another run's model.
_RESUMABLE_CHANGES = ("steps", "max_minutes", "compile")


def _run_identity(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES}


def _saved_identity(saved: dict) -> dict:
    """A checkpoint's run identity, with the options added since it was written at their defaults (as it ran)."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING and f.name not in _RESUMABLE_CHANGES}
    return {**defaults, **saved}


def _checkpoint(folder, cfg, model, ema, opt, step, losses, elapsed):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}  # clone: tied weights share storage
    meta = {"step": step, "losses": losses, "elapsed_s": elapsed, "param_groups": opt_state["param_groups"],
            "config": _run_identity(cfg)}
    _save_atomic(tensors, meta, folder)


def _resume(folder, cfg, model, ema, opt, device):
    meta = json.load(open(os.path.join(folder, "state.json")))
    saved = _saved_identity(meta.get("config") or {})
    if saved != _run_identity(cfg):
        raise ValueError(
            f"{folder} holds a run with another configuration ({saved}); this one is "
            f"{_run_identity(cfg)}. A resumed run may change only {_RESUMABLE_CHANGES}: pick another --out, or "
            "--no-resume to start over"
        )
    tensors = load_file(os.path.join(folder, "state.safetensors"), device=str(device))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v if name != "step" else v.cpu()
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["losses"], meta["elapsed_s"]


def export(kind: str, ema: torch.nn.Module, out: str) -> None:
    """The EMA weights as a `save_pretrained` folder (a pipeline, or the classifier), written atomically."""
    tmp = out + ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ema = copy.deepcopy(ema).cpu().eval().half()  # shipped in float16: half the size, loaded as float32
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    if kind == "image":
        ShapesImagePipeline(ema, scheduler).save_pretrained(tmp)
    elif kind == "video":
        ShapesVideoPipeline(ema.transformer, ema.text_encoder, ema.tokenizer, scheduler).save_pretrained(tmp)
    elif kind == "long-video":
        ShapesLongVideoPipeline(ema.transformer, ema.text_encoder, ema.tokenizer, scheduler).save_pretrained(tmp)
    else:
        ema.save_pretrained(tmp)
    _replace_folder(tmp, os.path.join(out, "model"))


def compile_network(model: torch.nn.Module, kind: str) -> None:
    """torch.compile the denoising network in place (parameter names, hence checkpoints and EMA, stay as they are)."""
    if kind == "classifier":
        raise ValueError("--compile is for the diffusion models; the classifier is small and calls its parts directly")
    # The long model's calls differ in the memory they see (none yet, earlier chunks, writing): a graph each.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    (model if kind == "image" else model.transformer).compile()


def train(cfg: TrainConfig, out: str, device: str = "cpu", resume: bool = True) -> dict:
    if cfg.motion_trail and cfg.kind != "video":
        raise ValueError(f"motion_trail is for the video model's data, not a {cfg.kind} model's")
    if cfg.high_noise_share and cfg.kind == "classifier":
        raise ValueError("high_noise_share is for the diffusion models: the classifier sees clean samples")
    if not 0 <= cfg.high_noise_share < 1:
        raise ValueError(f"high_noise_share is a share of each batch, in [0, 1): got {cfg.high_noise_share}")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build(cfg.kind).to(device).train()
    if cfg.init:
        _initialise(model, cfg.kind, cfg.init)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.compile:
        compile_network(model, cfg.kind)
    # On the GPU one fused kernel does the whole update: these small models' steps are bound by kernel launches.
    on_gpu = str(device).startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True if on_gpu else None)
    ckpt = os.path.join(out, "checkpoint")
    step, losses, elapsed = 0, [], 0.0
    if resume and _existing(ckpt):
        step, losses, elapsed = _resume(_existing(ckpt), cfg, model, ema, opt, device)
    start, window = time.perf_counter() - elapsed, []
    params, ema_params = list(model.parameters()), list(ema.parameters())
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=on_gpu)
    # The budget is this invocation's: a resumed run gets max_minutes more.
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes is not None else float("inf")
    with tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.kind}", mininterval=10) as bar:
        while step < cfg.steps and time.perf_counter() < deadline:
            # What draws from the global generator (dropout in the text encoder, DiT's label dropout) is a function
            # of the step too, so a resumed run goes on exactly as an uninterrupted one.
            torch.manual_seed(_step_seed(cfg, step, stream=2))
            with autocast:
                if cfg.kind == "classifier":
                    loss = _classifier_loss(model, step, cfg, device)
                elif cfg.kind == "long-video":
                    loss = _long_video_loss(model, step, cfg, device)
                else:
                    loss = _flow_matching_loss(model, cfg.kind, step, cfg, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():  # EMA with warm-up: short runs are not averaged towards their random init
                torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            window.append(loss.detach())
            if step % cfg.log_every == 0 or step == cfg.steps:
                losses.append([step, float(torch.stack(window).mean())])
                window = []
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(ckpt, cfg, model, ema, opt, step, losses, time.perf_counter() - start)
            bar.update()
    if window:  # stopped between two logged steps: the last steps' loss still counts
        losses.append([step, float(torch.stack(window).mean())])
    if step < cfg.steps:  # out of time: keep what was learned, resumable later
        _checkpoint(ckpt, cfg, model, ema, opt, step, losses, time.perf_counter() - start)
    export(cfg.kind, ema, out)
    report = {"config": asdict(cfg), "steps_done": step, "device": device, "wall_s": time.perf_counter() - start, "losses": losses,
              "torch": torch.__version__, "init_training": _init_training(cfg.init), "gpu": torch.cuda.get_device_name() if on_gpu else None}
    with open(os.path.join(out, "training.json.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(os.path.join(out, "training.json.tmp"), os.path.join(out, "training.json"))
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train a shapes reference model (resumable).")
    p.add_argument("kind", choices=sorted(DEFAULTS))
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, help="stop (checkpointed, exported) after this much wall time")
    p.add_argument("--init", help="start from the weights of this exported model folder (continued training)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU training)")
    p.add_argument("--high-noise-share", type=float, default=0.0,
                   help="share of each batch trained at noise levels t in [0.9, 1) (diffusion models)")
    p.add_argument("--motion-trail", action="store_true",
                   help="video: clips whose shapes draw a fading trail behind them (the direction shows in every frame)")
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    cfg = TrainConfig(kind=args.kind, seed=args.seed, max_minutes=args.max_minutes, init=args.init,
                      compile=args.compile, motion_trail=args.motion_trail,
                      high_noise_share=args.high_noise_share,
                      **{**DEFAULTS[args.kind], **overrides})
    if args.device.startswith("cuda"):
        torch.set_num_threads(2)  # the CPU only draws batch parameters; many threads per process just contend
    try:
        report = train(cfg, args.out, args.device, resume=not args.no_resume)
    except ValueError as err:  # bad options or a folder of another run: a message, not a traceback
        p.exit(2, f"{p.prog}: error: {err}\n")
    print(f"{cfg.kind}: {report['steps_done']} of {cfg.steps} steps in {report['wall_s']:.0f} s, final loss {report['losses'][-1][1] if report['losses'] else float('nan'):.4f} -> {args.out}/model")


if __name__ == "__main__":
    main()
