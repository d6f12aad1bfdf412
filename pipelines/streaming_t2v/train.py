"""Train StreamingT2V's memories on a frozen shapes-video base, and the open_clip shapes model that APM and the eval
harness's CLIPScore read. Seeded, resumable, progress bar; checkpoints and exports written atomically, safetensors only.

    python -m accel.pipelines.streaming_t2v.train clip      --out runs/shapes-clip      [--steps N] [--max-minutes M]
    python -m accel.pipelines.streaming_t2v.train streaming --out runs/shapes-streaming --clip shapes-clip:PATH [...]

`clip`: an open_clip model of the architecture `shapes-clip` (CLIP_CONFIG, passed to open_clip's own
`create_model`), trained contrastively on single frames of the shapes videos and their captions. Its export,
OUT/model, holds `open_clip_model.safetensors` and the architecture config `shapes-clip.json` beside it:
`ACCEL_CLIP=shapes-clip:OUT/model/open_clip_model.safetensors` loads it.

`streaming`: CAM and APM for the base (`--base`, default the shipped shapes-video), the base and the image encoder
frozen. A step draws a window of F frames from F + `max_start` frames of each path: CAM sees the window's first O
frames (clean: what the previous chunk left), APM the path's first frame (the anchor), and the loss is the base's
flow-matching loss on the whole window, as the chunk is generated. Its export is a StreamingT2V pipeline folder;
on the shipped base only the trained parts (the loader takes the base from shapes-video).

Every step's data and noise are functions of (seed, step), so a run resumed from OUT/checkpoint.safetensors (the
default when it exists) goes on exactly as if never stopped. The result: OUT/model and OUT/training.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..shapes.data import CLIP_FRAMES, video_batch
from ..shapes.models import with_positions
from ..shapes.text import embed_captions
# The base's own training conventions (step seeds, flow-matching noising), so the memories train on its objective.
from ..shapes.train import _noised, _replace_folder, _step_seed

CLIP_ARCH = "shapes-clip"
CLIP_CHECKPOINT = "open_clip_model.safetensors"
# A small ViT on the 32x32 frames (patches of 4: 64 tokens) and open_clip's text transformer with its BPE tokenizer
# (the vocabulary's embedding is most of the size; captions are at most 7 tokens with the start and end tokens).
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
DEFAULTS = {
    "clip": dict(steps=3000, batch_size=256, lr=1e-3),
    "streaming": dict(steps=4000, batch_size=128, lr=3e-4),
}
CAPTION_DROPOUT = 0.1  # as the base was trained: the unconditional branch sees the memories too


@dataclass
class TrainConfig:
    kind: str
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    max_minutes: float | None = None  # stop early (checkpointed and exported) when the wall-clock budget is spent
    base: str = "shapes-video"  # streaming: a shipped reference name or a ShapesVideoPipeline folder
    clip: str | None = None  # streaming: ACCEL_CLIP=ARCH:PATH of APM's image encoder; None trains CAM alone
    cam_blocks: int = 2
    chunk_frames: int = 16
    overlap_frames: int = 8
    max_start: int = 56  # windows start 0..max_start frames into the paths (shapes bounce after CLIP_FRAMES)
    ema_decay: float = 0.999
    log_every: int = 50
    checkpoint_every: int = 250


# What a resumed run may change: how long it goes on. Anything else would silently train another run's model.
_RESUMABLE_CHANGES = ("steps", "max_minutes")


def _identity(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES}


# Tasks: the trained module, its loss at a step, its export ----------------------------------------------------------

class ClipTask:
    """The open_clip shapes model, trained on (frame, caption) pairs."""

    def __init__(self, cfg: TrainConfig, out: str, device):
        import open_clip

        self.cfg, self.device = cfg, device
        self.config_path = os.path.join(out, f"{CLIP_ARCH}.json")
        _write_json(self.config_path, CLIP_CONFIG)
        open_clip.add_model_config(self.config_path)
        self.module = open_clip.create_model(CLIP_ARCH).to(device)
        self.tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
        preprocess = self.module.visual.preprocess_cfg
        self.mean = torch.tensor(preprocess["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], device=device).view(1, 3, 1, 1)

    def loss(self, model, step: int) -> torch.Tensor:
        """Contrastive loss over the batch with every pair of equal captions a positive (a batch holds repeats of the
        96 captions; open_clip's ClipLoss would push them apart). Frames come with and without motion trails, on
        alternate steps: the base draws trails, its long videos may not."""
        cfg = self.cfg
        batch = video_batch(cfg.seed, step, cfg.batch_size, trail=step % 2 == 0, device=self.device)
        g = torch.Generator().manual_seed(_step_seed(cfg, step))
        frame = torch.randint(CLIP_FRAMES, (cfg.batch_size,), generator=g).to(self.device)
        images = batch.pixels[torch.arange(cfg.batch_size, device=self.device), :, frame]  # (B, 3, H, W) in [-1, 1]
        images = ((images + 1) / 2 - self.mean) / self.std
        image_features, text_features, scale = model(images, self.tokenizer(batch.captions).to(self.device))
        logits = scale * image_features @ text_features.T
        same = torch.tensor([[a == b for b in batch.captions] for a in batch.captions], device=self.device).float()
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def export(self, ema, folder: str) -> None:
        weights = {k: v.detach().half().cpu().contiguous() for k, v in ema.state_dict().items()}
        save_file(weights, os.path.join(folder, CLIP_CHECKPOINT))
        shutil.copy(self.config_path, os.path.join(folder, f"{CLIP_ARCH}.json"))


class StreamingTask:
    """CAM and APM on the frozen base; the module trained is ModuleDict(cam=..., apm=...)."""

    def __init__(self, cfg: TrainConfig, out: str, device, base=None):
        from .image_encoder import load_image_encoder
        from .shapes import BASE, ShapesStreamingT2VPipeline

        self.cfg, self.device = cfg, device
        base = _load_base(cfg.base) if base is None else base
        base.to(device)
        for part in (base.transformer, base.text_encoder):
            part.eval().requires_grad_(False)
        self.encoder = load_image_encoder(cfg.clip).to(device).requires_grad_(False) if cfg.clip else None
        self.pipe = ShapesStreamingT2VPipeline.from_base(base, num_cam_blocks=cfg.cam_blocks,
                                                         image_encoder=self.encoder)
        self.base_is_shipped = cfg.base == BASE
        parts = {"cam": self.pipe.cam, **({"apm": self.pipe.apm} if self.pipe.apm is not None else {})}
        self.module = torch.nn.ModuleDict(parts).train().requires_grad_(True)

    def loss(self, model, step: int) -> torch.Tensor:
        cfg, pipe, device = self.cfg, self.pipe, self.device
        rng = torch.Generator().manual_seed(_step_seed(cfg, step, stream=1))
        start = int(torch.randint(0, cfg.max_start + 1, (1,), generator=rng))
        batch = video_batch(cfg.seed, step, cfg.batch_size, frames=start + cfg.chunk_frames, device=device)
        window = batch.pixels[:, :, start:]
        g = torch.Generator(device=device).manual_seed(_step_seed(cfg, step))
        xt, t, target = _noised(window, g)
        drop = torch.rand(cfg.batch_size, generator=g, device=device) < CAPTION_DROPOUT
        with torch.no_grad():
            text = embed_captions(pipe.tokenizer, pipe.text_encoder, batch.captions, device)
            anchor = self.encoder((batch.pixels[:, :, 0] + 1) / 2) if "apm" in model else None
        text = text * (~drop).view(-1, 1, 1).to(text.dtype)
        image_tokens = model["apm"].image_tokens(anchor) if anchor is not None else None
        cam_input = with_positions(pipe.transformer, window[:, :, : cfg.overlap_frames])
        with pipe.conditioned(cam_input, image_tokens):
            pred = pipe.transformer(with_positions(pipe.transformer, xt), timestep=t * 1000,
                                    encoder_hidden_states=text, return_dict=False)[0]
        return F.mse_loss(pred.float(), target)

    def export(self, ema, folder: str) -> None:
        """A StreamingT2V pipeline of the EMA memories in float16; on the shipped base, without the base's parts."""
        from .shapes import BASE_COMPONENTS, ShapesStreamingT2VPipeline

        memories = copy.deepcopy(ema).cpu().eval().half()
        pipe = self.pipe
        saved = ShapesStreamingT2VPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, cam=memories["cam"],
                                           text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                           apm=memories["apm"] if "apm" in memories else None)
        saved.save_pretrained(folder)
        if self.base_is_shipped:
            for name in BASE_COMPONENTS:
                shutil.rmtree(os.path.join(folder, name))


def _load_base(name: str):
    from ..shapes.pipelines import ShapesVideoPipeline
    from ..shapes.reference import _REFERENCES, reference_pipeline

    if name in _REFERENCES:
        return reference_pipeline(name)
    if not os.path.isdir(name):
        raise ValueError(f"--base must be a shipped reference name or a ShapesVideoPipeline folder, got {name!r}")
    return ShapesVideoPipeline.from_pretrained(name)


# Checkpoints: one safetensors file, replaced atomically ---------------------------------------------------------------

def _write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def save_checkpoint(path: str, cfg: TrainConfig, model, ema, opt, step: int, losses: list, elapsed: float) -> None:
    """Model, EMA and optimizer state in one safetensors file (the rest in its metadata), written beside `path`
    and renamed over it: a stop at any point leaves the previous checkpoint or this one, whole."""
    opt_state = opt.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, s in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # clone: tied weights share storage
    meta = {"step": step, "losses": losses, "elapsed_s": elapsed, "param_groups": opt_state["param_groups"],
            "config": _identity(cfg)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"state": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: TrainConfig, model, ema, opt, device) -> tuple[int, list, float]:
    with safe_open(path, "pt", device=str(device)) as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta["config"] != _identity(cfg):
        raise ValueError(f"{path} holds a run with another configuration ({meta['config']}); this one is "
                         f"{_identity(cfg)}. A resumed run may change only {_RESUMABLE_CHANGES}: pick another --out, "
                         "or --no-resume to start over")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v.cpu() if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["losses"], meta["elapsed_s"]


def _export(task, ema, out: str) -> None:
    tmp = os.path.join(out, "model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    task.export(ema, tmp)
    _replace_folder(tmp, os.path.join(out, "model"))


# The loop ------------------------------------------------------------------------------------------------------------

def _check(cfg: TrainConfig) -> None:
    if cfg.kind not in DEFAULTS:
        raise ValueError(f"kind must be one of {sorted(DEFAULTS)}, got {cfg.kind!r}")
    for name in ("steps", "batch_size", "chunk_frames", "cam_blocks", "log_every", "checkpoint_every"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    if not 0 < cfg.overlap_frames < cfg.chunk_frames:
        raise ValueError(f"overlap_frames must be in 1..chunk_frames - 1, got {cfg.overlap_frames}")
    if cfg.max_start < 0:
        raise ValueError(f"max_start must be >= 0, got {cfg.max_start}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")


def train(cfg: TrainConfig, out: str, device: str = "cpu", resume: bool = True, base=None) -> dict:
    """Runs (or resumes) the training `cfg` describes into `out`; `base` (streaming) a base pipeline object in place
    of loading `cfg.base`. Returns the training record (also written to OUT/training.json)."""
    _check(cfg)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    task = ClipTask(cfg, out, device) if cfg.kind == "clip" else StreamingTask(cfg, out, device, base)
    model = task.module
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    on_gpu = str(device).startswith("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True if on_gpu else None)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    step, losses, elapsed = 0, [], 0.0
    if resume and os.path.exists(ckpt):
        step, losses, elapsed = load_checkpoint(ckpt, cfg, model, ema, opt, device)
    start, window = time.perf_counter() - elapsed, []
    ema_params = [p for p, q in zip(ema.parameters(), model.parameters()) if q.requires_grad]
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=on_gpu)
    # The budget is this invocation's: a resumed run gets max_minutes more.
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes is not None else float("inf")
    with tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.kind}", mininterval=10) as bar:
        while step < cfg.steps and time.perf_counter() < deadline:
            torch.manual_seed(_step_seed(cfg, step, stream=2))  # anything drawing from the global generator
            with autocast:
                loss = task.loss(model, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():  # EMA with warm-up: short runs are not averaged towards their init
                torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            window.append(loss.detach())
            if step % cfg.log_every == 0 or step == cfg.steps:
                losses.append([step, float(torch.stack(window).mean())])
                window = []
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt, cfg, model, ema, opt, step, losses, time.perf_counter() - start)
            bar.update()
    if window:  # stopped between two logged steps: the last steps' loss still counts
        losses.append([step, float(torch.stack(window).mean())])
    if step < cfg.steps:  # out of time: keep what was learned, resumable later
        save_checkpoint(ckpt, cfg, model, ema, opt, step, losses, time.perf_counter() - start)
    _export(task, ema, out)
    report = {"config": asdict(cfg), "steps_done": step, "device": str(device), "wall_s": time.perf_counter() - start,
              "losses": losses, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "gpu": torch.cuda.get_device_name() if on_gpu else None}
    _write_json(os.path.join(out, "training.json"), report)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train StreamingT2V's memories or the open_clip shapes model (resumable).")
    p.add_argument("kind", choices=sorted(DEFAULTS))
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, help="stop (checkpointed, exported) after this much wall time")
    p.add_argument("--base", default="shapes-video", help="streaming: shipped reference name or ShapesVideoPipeline folder")
    p.add_argument("--clip", help="streaming: APM's image encoder, ARCH:PATH as ACCEL_CLIP takes it (none: CAM alone)")
    p.add_argument("--cam-blocks", type=int, default=2)
    p.add_argument("--max-start", type=int, default=56)
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    cfg = TrainConfig(kind=args.kind, seed=args.seed, max_minutes=args.max_minutes, base=args.base, clip=args.clip,
                      cam_blocks=args.cam_blocks, max_start=args.max_start, **{**DEFAULTS[args.kind], **overrides})
    if cfg.kind == "clip" and (args.clip or args.base != "shapes-video"):
        p.error("--clip and --base are for the streaming kind")
    if args.device.startswith("cuda"):
        torch.set_num_threads(2)  # the CPU only draws batch parameters; many threads per process just contend
    try:
        report = train(cfg, args.out, args.device, resume=not args.no_resume)
    except ValueError as err:  # bad options or a folder of another run: a message, not a traceback
        p.exit(2, f"{p.prog}: error: {err}\n")
    final = report["losses"][-1][1] if report["losses"] else float("nan")
    print(f"{cfg.kind}: {report['steps_done']} of {cfg.steps} steps in {report['wall_s']:.0f} s, final loss "
          f"{final:.4f} -> {args.out}/model")


if __name__ == "__main__":
    main()


@torch.no_grad()
def clip_caption_accuracy(spec: str, seed: int = 1000, videos: int = 256) -> dict[str, float]:
    """Held-out check of an open_clip shapes model (ACCEL_CLIP's ARCH:PATH): for one random frame of each of
    `videos` videos (half with motion trails), is the nearest of the 96 captions right about the shape, colour and
    direction? (Without a trail one frame cannot show the direction: chance is 25% there.)"""
    from ..shapes.text import VIDEO_CAPTIONS
    from .image_encoder import load_image_encoder

    import open_clip

    encoder = load_image_encoder(spec)
    arch = spec.partition(":")[0]
    model = open_clip.create_model(arch, pretrained=spec.partition(":")[2]).eval()
    text = F.normalize(model.encode_text(open_clip.get_tokenizer(arch)(list(VIDEO_CAPTIONS))), dim=-1)
    result = {}
    for trail in (True, False):
        batch = video_batch(seed, int(trail), videos // 2, trail=trail)
        frame = torch.randint(CLIP_FRAMES, (videos // 2,), generator=torch.Generator().manual_seed(seed))
        images = (batch.pixels[torch.arange(videos // 2), :, frame] + 1) / 2
        nearest = (F.normalize(encoder(images), dim=-1) @ text.T).argmax(1).tolist()
        for part, index in (("colour", 1), ("shape", 2), ("direction", 4)):
            right = [VIDEO_CAPTIONS[n].split()[index] == c.split()[index] for n, c in zip(nearest, batch.captions)]
            result[f"{'trail' if trail else 'plain'}_{part}"] = sum(right) / len(right)
    return result
