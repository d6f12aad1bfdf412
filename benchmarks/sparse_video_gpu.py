"""Sparse attention for video DiTs on the GPU (issue 25): tile-ordered 3-D windows, dynamic block masks, a Wan step.

    python benchmarks/sparse_video_gpu.py [--sections tiles,dynamic,step,compose,step_compiled,hunyuan] [--deadline 300]
        [--out benchmarks/results/sparse_video_<card>.json]

bf16, batch 1, head dim 128, 128-token blocks. Times are `triton.testing.do_bench` medians (L2 flushed before every
call); TFLOP/s count 4 * D FLOPs per (query, key) pair inside the computed blocks.

tiles: the sliding-tile window (tile_order.py, tiles (2, 8, 8), windows (1, 1, 1) and (1, 2, 2) tiles) at Wan-1.3B
    (12 heads, 21 x 30 x 52 = 32,760 tokens) and Wan-14B (40 heads, 21 x 45 x 80 = 75,600) shapes: our kernel as
    called (`choose_config`: the Gluon kernel on Hopper) on tile-ordered q / k / v; the same with the processor's
    gathers into and out of tile order; FlexAttention (compiled) over the same block lists; and, at Wan-1.3B, the
    raster-order alternatives with the same token mask: FlexAttention with a mask_mod (create_block_mask, compiled),
    and our `local_3d` token-rule window of similar reach (radius (2, 8, 8)) for reference. Checked against a chunked
    fp32 reference on sampled query blocks.
dynamic: `dynamic_block_mask` (pool + scores + selection on the GPU) + the kernel, against the kernel with that mask
    prebuilt (as a `table_mask`, the usual path, and as the device mask), at FLUX (24 x 4608), Wan-1.3B and Wan-14B
    shapes, budgets 25% / 10% (top-k) and mass 0.9 (capped at 25%); the selection identical to the PyTorch reference
    on the GPU's scores; the call run once under torch.cuda.set_sync_debug_mode("error") (no host sync) and replayed
    from a CUDA graph; per-call `table_mask` (the host-synchronising path the issue measured) for comparison; the
    build's device time per stage (pool, score GEMM, selection) and its host time per call.
step: a Wan-2.1-1.3B-shaped transformer (random init, diffusers) at 480p / 81 frames, one step: dense vs local_3d vs
    tiled_3d (and dynamic, hybrid), medians of 3 steps after a warm-up step (needs diffusers).
step_compiled: the step, dense and under the Wan preset, eager and with diffusers' regional compilation
    (`compile_repeated_blocks`), side by side (`bench_step_compiled`).
hunyuan: a HunyuanVideo-shaped step (full width, a fifth of the depth) at 720p / 129 frames: dense against the
    family's sparse preset (`bench_hunyuan`).
compose: the same model over a 20-step loop (cg_taylor_gpu.py's, one cache_context a step), one warm-up then one timed
    generation each: dense; tiled_3d; cg_taylor (its Wan preset: fixed schedule); cg_taylor composed with tiled_3d.
    Seconds per generation, median computed / predicted step, speedup over dense, final latent's distance to dense's.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _sibling(name: str):
    """Another benchmark script of this folder, loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bsg = _sibling("block_sparse_attention_gpu")  # its loader, timing and FlexAttention helpers
bsa = bsg.bsa

import accel.kernels.block_sparse.dynamic_mask as dyn  # noqa: E402
import accel.kernels.block_sparse.tile_order as tiles  # noqa: E402

DEV, BLOCK, D = "cuda", 128, 128
SHAPES = {
    "flux": dict(heads=24, n=4608, grid=(1, 64, 72)),  # 4608 tokens (image + text as one sequence: dynamic only)
    "wan1.3b": dict(heads=12, n=32760, grid=(21, 30, 52)),
    "wan14b": dict(heads=40, n=75600, grid=(21, 45, 80)),
}
TILE = (2, 8, 8)
WINDOWS = ((1, 1, 1), (1, 2, 2))
T0 = time.perf_counter()
log, time_ms, rel_err = bsg.log, bsg.time_ms, bsg.rel_err


def qkv(heads, n, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, heads, n, D, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3)]


def flops(mask, heads):
    return 4.0 * D * mask.computed_pairs() * heads / mask.shape[1]


def sampled_error(q, k, v, mask, out) -> float:
    return bsg.sampled_reference_error(q, k, v, mask, out)


def raster_flex(flex_fn, tiled, heads, n):
    """FlexAttention in raster order with the tiled mask's token semantics: a mask_mod on the tiled blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    full, partial = tiled.mask.block_tables()
    listed = (full | partial)[0, 0]
    blk = (tiled.inverse // BLOCK).to(torch.int32)

    def mod(b, h, q_idx, kv_idx):
        return listed[blk[q_idx], blk[kv_idx]]

    t = time.perf_counter()
    bm = create_block_mask(mod, 1, 1, n, n, device=DEV, BLOCK_SIZE=BLOCK, _compile=True)
    torch.cuda.synchronize()
    return bm, time.perf_counter() - t


def bench_tiles(names, flex, deadline, res: dict) -> dict:
    BlockMask, flex_fn = flex
    for name in names:
        spec = SHAPES[name]
        heads, n, grid = spec["heads"], spec["n"], spec["grid"]
        q, k, v = qkv(heads, n)
        r = res[name] = {"shape": [1, heads, n, D], "grid": grid, "tile": TILE, "windows": {}}
        r["sdpa_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        flex_masks = bsg.FlexMasks(BlockMask, heads, n)
        for window in WINDOWS:
            if time.perf_counter() - T0 > deadline:
                r["windows"][str(window)] = "skipped: deadline"
                continue
            t = time.perf_counter()
            tiled = tiles.tiled_window_mask(grid, TILE, window, BLOCK, device=DEV)
            torch.cuda.synchronize()
            w = {"build_s": time.perf_counter() - t, "block_density": tiled.density()}
            mask = tiled.mask
            qt, kt, vt = (x.index_select(2, tiled.perm) for x in (q, k, v))
            cfg = bsa.choose_config(qt, kt, vt, mask)
            w["config"] = bsg.cfg_name(cfg)
            w["ms"] = time_ms(lambda: bsa.block_sparse_attention(qt, kt, vt, mask))
            fl = flops(mask, heads)
            w["tflops_computed_blocks"] = fl / w["ms"] / 1e9
            # The processor's layout: (B, N, H, D) rows gathered into tile order, the output gathered back.
            qn, kn, vn = (x.transpose(1, 2).contiguous() for x in (q, k, v))

            def with_gathers():
                a, b, c = (x.index_select(1, tiled.perm) for x in (qn, kn, vn))
                o = bsa.block_sparse_attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), mask)
                return o.transpose(1, 2).index_select(1, tiled.inverse)

            w["with_gathers_ms"] = time_ms(with_gathers)
            out = bsa.block_sparse_attention(qt, kt, vt, mask)
            w["rel_err_vs_fp32_reference_sampled"] = sampled_error(qt, kt, vt, mask, out)
            got = with_gathers().transpose(1, 2)
            w["gathered_path_equals_kernel"] = bool(torch.equal(got.index_select(2, tiled.perm), out))
            bm = flex_masks.block_mask(mask)
            flex_out = flex_fn(qt, kt, vt, block_mask=bm)
            w["flex_same_blocks_ms"] = time_ms(lambda: flex_fn(qt, kt, vt, block_mask=bm))
            w["flex_same_blocks_tflops"] = fl / w["flex_same_blocks_ms"] / 1e9
            w["flex_rel_err_vs_fp32_reference_sampled"] = sampled_error(qt, kt, vt, mask, flex_out)
            w["speedup_vs_flex_same_blocks"] = w["flex_same_blocks_ms"] / w["ms"]
            w["speedup_vs_sdpa"] = r["sdpa_ms"] / w["ms"]
            if name == "wan1.3b":  # raster order with the same token mask: what FlexAttention users would write
                try:
                    rbm, build_s = raster_flex(flex_fn, tiled, heads, n)
                    w["flex_raster_mask_mod_build_s"] = build_s
                    w["flex_raster_mask_mod_ms"] = time_ms(lambda: flex_fn(q, k, v, block_mask=rbm))
                    w["speedup_vs_flex_raster_mask_mod"] = w["flex_raster_mask_mod_ms"] / w["with_gathers_ms"]
                    fo = flex_fn(q, k, v, block_mask=rbm)
                    w["flex_raster_equals_ours_rel"] = rel_err(fo, got)
                except Exception as e:  # reported, not fatal
                    w["flex_raster_mask_mod"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            r["windows"][str(window)] = w
            log(name, "tiled", window, json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in w.items()}))
            del qt, kt, vt, qn, kn, vn, out, flex_out
            torch.cuda.empty_cache()
        if name == "wan1.3b" and time.perf_counter() - T0 < deadline:  # the token-rule window it replaces
            local = bsa.local_3d_mask(grid, (2, 8, 8), BLOCK, device=DEV)
            lw = {"block_density": local.density(), "config": bsg.cfg_name(bsa.choose_config(q, k, v, local))}
            lw["ms"] = time_ms(lambda: bsa.block_sparse_attention(q, k, v, local))
            lw["tflops_computed_blocks"] = flops(local, heads) / lw["ms"] / 1e9
            r["local_3d_radius_2_8_8_raster"] = lw
            log(name, "local_3d", lw)
        del q, k, v
        torch.cuda.empty_cache()
    return res


DYNAMIC_CASES = {"top25": dict(budget=0.25), "top10": dict(budget=0.10), "mass0.9_cap25": dict(mass=0.9, cap=0.25)}


def selection_differences(sel, want, scores, mass) -> dict:
    """Rows where the kernel's selection and the reference's differ, and for the mass rule how close each such row
    comes to the threshold (the smallest |mass before a block - mass| in float64): ~1e-7 is float32 summation order."""
    rows = (sel[0] != want[0]) | (sel[2] != want[2]) | (sel[1] != want[1]).any(-1)
    out = {"rows_differing": int(rows.sum()), "rows": rows.numel()}
    if mass is not None and bool(rows.any()):
        p = torch.softmax(scores[rows].double(), -1).sort(-1, descending=True).values
        out["largest_distance_to_threshold"] = float(((p.cumsum(-1) - p) - mass).abs().amin(-1).max())
    return out


def build_stages(q, k, scores, n: int, kw: dict) -> dict:
    """The dynamic mask's build, stage by stage (device time): pooling, the score GEMM, the selection."""
    qp, kp = dyn.block_pool(q, k, BLOCK)
    sel = (n, BLOCK, kw.get("width", kw.get("budget")), kw.get("budget"), kw.get("mass"), kw["sink_blocks"],
           kw["diagonal"])
    return {"pool": time_ms(lambda: dyn.block_pool(q, k, BLOCK)),
            "scores_gemm": time_ms(lambda: torch.matmul(qp, kp.transpose(-1, -2))),
            "select": time_ms(lambda: dyn.select_blocks(scores, *sel))}


def host_ms(fn, calls: int = 50) -> float:
    """Host time of one call (Python and launches, the device left to run behind): what bounds a small kernel's
    eager calls when the host cannot keep ahead of the device."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed * 1e3 / calls


def bench_dynamic(names, deadline, res: dict) -> dict:
    for name in names:
        spec = SHAPES[name]
        heads, n = spec["heads"], spec["n"]
        q, k, v = qkv(heads, n, seed=1)
        # Keys with some structure (random data pools to near-identical block means): a slow drift along the sequence.
        drift = torch.randn(1, heads, 1, D, device=DEV, dtype=torch.bfloat16)
        pos = torch.linspace(-1, 1, n, device=DEV, dtype=torch.bfloat16)[None, None, :, None]
        k = k + pos * drift
        q = q + pos.flip(2) * drift
        mk = -(-n // BLOCK)
        r = res[name] = {"shape": [1, heads, n, D], "cases": {}}
        for case, c in DYNAMIC_CASES.items():
            if time.perf_counter() - T0 > deadline:
                r["cases"][case] = "skipped: deadline"
                continue
            if "budget" in c:
                kw = dict(budget=max(2, math.ceil(c["budget"] * mk)), sink_blocks=1, diagonal=True, block_size=BLOCK)
            else:
                kw = dict(mass=c["mass"], width=max(2, math.ceil(c["cap"] * mk)), sink_blocks=1, diagonal=True,
                          block_size=BLOCK)
            build = lambda: dyn.dynamic_block_mask(q, k, **kw)  # noqa: E731
            mask = build()
            full, part = mask.block_tables()
            table = full | part
            prebuilt = bsa.table_mask(table, n, block_size=BLOCK)
            w = {"kwargs": kw, "block_density": prebuilt.density()}
            # Selection on the GPU identical to the PyTorch reference on the same scores.
            scores = dyn.block_scores(q, k, BLOCK)
            sel = dyn.select_blocks(scores, n, BLOCK, kw.get("width", kw.get("budget")), kw.get("budget"), kw.get("mass"),
                                    kw["sink_blocks"], kw["diagonal"])
            want = dyn.select_blocks_reference(scores, n, BLOCK, kw.get("width", kw.get("budget")), kw.get("budget"),
                                               kw.get("mass"), kw["sink_blocks"], kw["diagonal"])
            w["selection_identical_to_reference"] = all(bool(torch.equal(a, b)) for a, b in zip(sel, want))
            if not w["selection_identical_to_reference"]:
                w["selection_differences"] = selection_differences(sel, want, scores, kw.get("mass"))
            w["scores_rel_err_vs_reference"] = rel_err(scores, dyn.block_scores_reference(q, k, BLOCK))
            w["kernel_prebuilt_table_mask_ms"] = time_ms(lambda: bsa.block_sparse_attention(q, k, v, prebuilt))
            w["kernel_prebuilt_device_mask_ms"] = time_ms(lambda: bsa.block_sparse_attention(q, k, v, mask))
            w["build_ms"] = time_ms(build)
            w["build_stages_ms"] = build_stages(q, k, scores, n, kw)
            w["build_host_ms"] = host_ms(build)
            w["build_plus_kernel_ms"] = time_ms(lambda: bsa.block_sparse_attention(q, k, v, build()))
            w["ratio_build_plus_kernel_vs_prebuilt"] = w["build_plus_kernel_ms"] / w["kernel_prebuilt_table_mask_ms"]
            w["tflops_computed_blocks_prebuilt"] = flops(prebuilt, heads) / w["kernel_prebuilt_table_mask_ms"] / 1e9
            out = bsa.block_sparse_attention(q, k, v, mask)
            w["rel_err_vs_fp32_reference_sampled"] = sampled_error(q, k, v, mask, out)
            w["equals_prebuilt_output"] = bool(torch.equal(out, bsa.block_sparse_attention(q, k, v, prebuilt)))
            torch.cuda.synchronize()
            try:  # no host synchronisation anywhere in build + kernel
                torch.cuda.set_sync_debug_mode("error")
                bsa.block_sparse_attention(q, k, v, build())
                w["no_host_sync"] = True
            except RuntimeError as e:
                w["no_host_sync"] = f"failed: {str(e)[:300]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
            try:  # and inside a CUDA graph
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        bsa.block_sparse_attention(q, k, v, build())
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    g_out = bsa.block_sparse_attention(q, k, v, build())
                graph.replay()
                torch.cuda.synchronize()
                w["cuda_graph_equals_eager"] = bool(torch.equal(g_out, out))
                w["cuda_graph_build_plus_kernel_ms"] = time_ms(graph.replay)
                del graph, g_out
            except Exception as e:
                w["cuda_graph"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            if name == "flux":  # the baseline: a bool table per call through table_mask (host syncs)
                w["per_call_table_mask_plus_kernel_ms"] = time_ms(
                    lambda: bsa.block_sparse_attention(q, k, v, bsa.table_mask(table, n, block_size=BLOCK)))
            r["cases"][case] = w
            log(name, "dynamic", case, json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in w.items()}))
        del q, k, v
        torch.cuda.empty_cache()
    return res


def _wan_1_3b():
    """A Wan-2.1-1.3B-shaped transformer (random init, bf16) and its inputs at 480p / 81 frames."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    with torch.device(DEV):
        m = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        x = {"hidden_states": torch.randn(1, 16, 21, 60, 104, **bf), "encoder_hidden_states": torch.randn(1, 512, 4096, **bf)}
    return m.to(torch.bfloat16).eval(), x


def bench_step(deadline, res: dict) -> dict:
    import accel
    from accel.attention.sparse import dynamic, hybrid, tiled_3d

    m, x = _wan_1_3b()
    t = torch.full((1,), 500.0, device=DEV)

    def step():
        with torch.no_grad():
            return m(**x, timestep=t, return_dict=False)[0]

    def timed(k=3):
        step()  # warm-up: mask build, compilation
        per = []
        for _ in range(k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step()
            torch.cuda.synchronize()
            per.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(per), per, out

    res.update({"model": "Wan2.1-1.3B shape, random init, bf16", "latent": [1, 16, 21, 60, 104], "tokens": 32760})
    ms, per, dense_out = timed()
    res["dense"] = {"step_ms": ms, "steps_ms": per}
    log("step dense", ms)
    configs = {"local_3d": "local_3d", "tiled_3d": tiled_3d(), "dynamic_25": dynamic(budget=0.25),
               "hybrid_tiled_3d": hybrid(tiled_3d())}
    for name, pattern in configs.items():
        if time.perf_counter() - T0 > deadline:
            res[name] = "skipped: deadline"
            continue
        with accel.patch(m, method="sparse_attention", pattern=pattern):
            ms, per, out = timed()
        res[name] = {"step_ms": ms, "steps_ms": per, "speedup_vs_dense": res["dense"]["step_ms"] / ms,
                     "rel_diff_vs_dense_output": rel_err(out, dense_out)}
        log("step", name, res[name])
    return res


def bench_step_compiled(res: dict) -> dict:
    """The Wan-1.3B step of `bench_step`, dense and under the family preset, each eager and with its blocks compiled
    (`compile_repeated_blocks`, diffusers' regional compilation): does compiling the rest of the step (projections,
    feed-forward, norms) lift the sparse step's ratio to dense? Medians of 3 steps after 2 warm-up steps
    (compilation); the graph breaks Dynamo reported."""
    import accel
    from torch._dynamo.utils import counters

    m, x = _wan_1_3b()
    t = torch.full((1,), 500.0, device=DEV)

    def timed(k=3):
        per = []
        with torch.no_grad():
            for i in range(2 + k):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = m(**x, timestep=t, return_dict=False)[0]
                torch.cuda.synchronize()
                per.append(1e3 * (time.perf_counter() - t0))
        return {"step_ms": statistics.median(per[2:]), "steps_ms": per[2:], "warmup_ms": per[:2]}, out

    res.update({"model": "Wan2.1-1.3B shape, random init, bf16, 480p / 81 frames", "compile": "compile_repeated_blocks"})
    outputs = {}
    for pattern in ("dense", "preset"):
        handle = accel.patch(m, method="sparse_attention") if pattern == "preset" else None
        for compiled in (False, True):
            name = f"{pattern}_{'compiled' if compiled else 'eager'}"
            torch._dynamo.reset()
            counters.clear()
            if compiled:
                m.compile_repeated_blocks()
            res[name], outputs[name] = timed()
            res[name]["graph_breaks"] = dict(counters["graph_break"])
            log("step_compiled", name, res[name])
            if compiled:  # back to the eager blocks (nn.Module.compile keeps the compiled call here)
                for block in m.blocks:
                    block._compiled_call_impl = None
        if handle is not None:
            handle.remove()
    for name in ("preset_eager", "preset_compiled", "dense_compiled"):
        res[name]["speedup_vs_dense_eager"] = res["dense_eager"]["step_ms"] / res[name]["step_ms"]
    res["preset_compiled"]["speedup_vs_dense_compiled"] = res["dense_compiled"]["step_ms"] / res["preset_compiled"]["step_ms"]
    res["preset_compiled"]["rel_diff_vs_preset_eager_output"] = rel_err(outputs["preset_compiled"], outputs["preset_eager"])
    return res


HUNYUAN_DEPTH = dict(num_layers=4, num_single_layers=8)  # a fifth of HunyuanVideo's 20 + 40 blocks, full width


def bench_hunyuan(res: dict) -> dict:
    """A HunyuanVideo-shaped step (random init, bf16, full width, a fifth of the depth) at 720p / 129 frames (grid
    33 x 45 x 80 = 118,800 image tokens + 256 text tokens, 200 of them valid): dense (diffusers' attention) against
    the family's preset (`accel.patch(m, "sparse_attention")`, pattern "preset"), medians of 3 steps after a warm-up.
    Every block is alike, so the ratio carries to the full depth."""
    import accel
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    with torch.device(DEV):
        m = HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_refiner_layers=2,
            mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
            pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56), **HUNYUAN_DEPTH)
    m = m.to(torch.bfloat16).eval()
    text_mask = torch.zeros(1, 256, dtype=torch.long, device=DEV)
    text_mask[:, :200] = 1
    x = {"hidden_states": torch.randn(1, 16, 33, 90, 160, **bf), "encoder_hidden_states": torch.randn(1, 256, 4096, **bf),
         "encoder_attention_mask": text_mask, "pooled_projections": torch.randn(1, 768, **bf),
         "timestep": torch.full((1,), 500.0, device=DEV), "guidance": torch.full((1,), 6000.0, device=DEV)}

    def timed(k=3):
        with torch.no_grad():
            out = m(**x, return_dict=False)[0]  # warm-up: mask build, compilation
            per = []
            for _ in range(k):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = m(**x, return_dict=False)[0]
                torch.cuda.synchronize()
                per.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(per), per, out

    res.update({"model": "HunyuanVideo shape, random init, bf16, 24 heads x 128, "
                         f"{HUNYUAN_DEPTH['num_layers']} dual + {HUNYUAN_DEPTH['num_single_layers']} single blocks",
                "latent": [1, 16, 33, 90, 160], "image_tokens": 33 * 45 * 80, "text_tokens": 256, "valid_text": 200})
    ms, per, dense_out = timed()
    res["dense"] = {"step_ms": ms, "steps_ms": per}
    log("hunyuan dense", ms)
    with accel.patch(m, method="sparse_attention") as handle:
        ms, per, out = timed()
        res["preset"] = {"step_ms": ms, "steps_ms": per, "speedup_vs_dense": res["dense"]["step_ms"] / ms,
                         "rel_diff_vs_dense_output": rel_err(out, dense_out), "stats": str(handle.stats())[:500]}
    log("hunyuan preset", res["preset"])
    return res


def bench_compose(res: dict, steps: int = 20) -> dict:
    """Sparse attention and CG-Taylor each and together over a whole generation: attention shortens computed steps,
    caching removes steps, so the two should multiply."""
    import accel
    from accel.attention.sparse import tiled_3d

    cgt = _sibling("cg_taylor_gpu")
    m, x, _, _ = cgt.build("wan")
    res.update({"model": "Wan2.1-1.3B shape, random init, bf16, 480p / 81 frames", "steps": steps})
    sparse = ("sparse_attention", {"pattern": tiled_3d()})
    cache = ("cg_taylor", {"num_inference_steps": steps})  # the Wan preset: a fixed schedule
    configs = {"dense": [], "tiled_3d": [sparse], "cg_taylor": [cache], "cg_taylor+tiled_3d": [sparse, cache]}
    dense_latent = None
    for name, methods in configs.items():
        handles = [accel.patch(m, method=method, **options) for method, options in methods]
        try:
            cgt.run_loop(m, x, steps, "wan")  # warm-up
            per, latent = cgt.run_loop(m, x, steps, "wan")
            predicted = {i for h in handles for i in h.stats().get("predicted_steps", [])}
        finally:
            for h in reversed(handles):
                h.remove()
        computed = [p for i, p in enumerate(per) if i not in predicted]
        r = res[name] = {"generation_s": sum(per), "computed": len(computed),
                         "median_computed_step_ms": 1e3 * statistics.median(computed)}
        if dense_latent is None:
            dense_latent = latent
        else:
            r["speedup_vs_dense"] = res["dense"]["generation_s"] / r["generation_s"]
            r["rel_diff_vs_dense_latent"] = rel_err(latent, dense_latent)
        log("compose", name, r)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="tiles,dynamic,step,compose")
    p.add_argument("--deadline", type=float, default=300.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    card = "h200" if "H200" in torch.cuda.get_device_name() else "h100" if "H100" in torch.cuda.get_device_name() else "gpu"
    out_path = args.out or os.path.join(HERE, "results", f"sparse_video_{card}.json")
    res = {"env": {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                   "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                   "python": platform.python_version(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "dtype": "bfloat16", "block_size": BLOCK, "head_dim": D}}

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        json.dump(res, open(out_path + ".tmp", "w"), indent=1)
        os.replace(out_path + ".tmp", out_path)

    sections = args.sections.split(",")

    def guarded(key, fn):
        part = res[key] = {}  # filled as the section goes: what ran before a failure is kept
        try:
            fn(part)
        except Exception as e:  # a section that breaks is reported with its traceback; the others still run
            import traceback

            traceback.print_exc()
            part["failed"] = f"{type(e).__name__}: {str(e)[:500]}"
            torch.cuda.set_sync_debug_mode(0)
        save()

    if "dynamic" in sections:
        guarded("dynamic", lambda part: bench_dynamic(["flux", "wan1.3b", "wan14b"], args.deadline, part))
    if "tiles" in sections:
        guarded("tiles", lambda part: bench_tiles(["wan1.3b", "wan14b"], bsg.flex_setup(), args.deadline, part))
    if "step" in sections:
        guarded("step", lambda part: bench_step(args.deadline + 120, part))
    if "compose" in sections:
        guarded("compose", lambda part: bench_compose(part))
    if "step_compiled" in sections:
        guarded("step_compiled", lambda part: bench_step_compiled(part))
    if "hunyuan" in sections:
        guarded("hunyuan", lambda part: bench_hunyuan(part))
    # Summary table (the reply carries the end of the output).
    for name, r in res.get("tiles", {}).items():
        if not isinstance(r, dict) or "windows" not in r:
            continue
        for wname, w in r["windows"].items():
            if isinstance(w, dict):
                print(f"tiles {name} window {wname}: dens {w['block_density']:.3f} ours {w['ms']:.3f} ms "
                      f"{w['tflops_computed_blocks']:.0f} TF/s (+gathers {w['with_gathers_ms']:.3f} ms) | flex same blocks "
                      f"{w['flex_same_blocks_ms']:.3f} ms x{w['speedup_vs_flex_same_blocks']:.2f} | flex raster "
                      f"{w.get('flex_raster_mask_mod_ms', float('nan')):.3f} ms | sdpa {r['sdpa_ms']:.3f} ms")
        if "local_3d_radius_2_8_8_raster" in r:
            lw = r["local_3d_radius_2_8_8_raster"]
            print(f"tiles {name} local_3d raster: dens {lw['block_density']:.3f} {lw['ms']:.3f} ms "
                  f"{lw['tflops_computed_blocks']:.0f} TF/s")
    for name, r in res.get("dynamic", {}).items():
        if not isinstance(r, dict) or "cases" not in r:
            continue
        for case, w in r["cases"].items():
            if isinstance(w, dict):
                print(f"dynamic {name} {case}: dens {w['block_density']:.3f} prebuilt {w['kernel_prebuilt_table_mask_ms']:.3f}"
                      f" ms, build {w['build_ms']:.3f} ms, build+kernel {w['build_plus_kernel_ms']:.3f} ms "
                      f"(x{w['ratio_build_plus_kernel_vs_prebuilt']:.3f}), graph "
                      f"{w.get('cuda_graph_build_plus_kernel_ms', float('nan')):.3f} ms, same selection "
                      f"{w['selection_identical_to_reference']}, no sync {w['no_host_sync']}")
    for name, s in res.get("step", {}).items():
        if isinstance(s, dict):
            print(f"step {name}: {s['step_ms']:.1f} ms x{s.get('speedup_vs_dense', 1.0):.2f}")
    print("results:", out_path)


if __name__ == "__main__":
    main()
