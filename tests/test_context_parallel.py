"""cg_taylor and sparse_attention under diffusers' context parallelism: 2 processes over gloo on the CPU.

One pair of worker processes (spawned once for the module: each costs seconds of imports) runs every case and saves
what it saw; the tests compare the ranks with each other and with the one-process run of the same inputs. The ranks
meet through a file store in the test's temporary folder (no port to pick), every collective has a timeout, a case
that fails on one rank stops both (its traceback is the failure of its test; later cases report that they did not
run), and the whole run has a deadline after which the workers are killed.

Two limits of diffusers 0.42.1 on a CPU-only machine, handled here:
- `enable_parallelism` picks the device `rank % torch.accelerator.device_count()`, and the count is 0 without an
  accelerator (ZeroDivisionError): the workers report 1 device, so the ranks run on cpu:0, as they would on one GPU.
  Every config gets a CPU mesh of its own (`_cp`), so that on a machine with GPUs the ranks still run on the CPU.
- Ring attention needs each step's log-sum-exp, which only CUDA / NPU backends return (flash, cuDNN, Sage, ...);
  the one CPU backend, native SDPA, raises "Native attention does not support return_lse=True". CG-Taylor's
  reduction under a ring config is checked with a real ring config on the polynomial model (no attention), and the
  end-to-end ring run is skipped while that error stands.
Kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here when this file runs alone).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, in this process and the workers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from diffusers import ContextParallelConfig, ModelMixin, ParallelConfig  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import accel  # noqa: E402
import poly_model as pm  # noqa: E402
import tiny_models as tm  # noqa: E402
from accel import cg_taylor  # noqa: E402
from accel.attention.sparse import _heads_to_sequence, _sequence_to_heads  # noqa: E402
from accel.cg_taylor import gate_error  # noqa: E402
from accel.parallel import check_private_names  # noqa: E402
from test_cg_taylor import denoise  # noqa: E402
from test_cg_taylor_modes import run  # noqa: E402

WORLD = 2
STEPS = 10
GATE = dict(threshold=0.05, warmup_steps=2, num_inference_steps=STEPS)  # a mix of computed and predicted steps
SPARSE = {  # per-head masks (strided_shards, window_global_random) and per-head choices from q, k (dynamic)
    "strided_shards": "strided_shards(num_shards=2, local_blocks=0, block_size=16)",
    "window_global_random": "window_global_random(window_blocks=0, global_blocks=0, random_blocks=1, seed=3, "
                            "tile=None, block_size=16)",
    "dynamic": "dynamic(budget=0.5, sink_blocks=0, diagonal=False, tile=None, block_size=16)",
}
RING_UNSUPPORTED = "return_lse"
COLLECTIVE_TIMEOUT_S = 60  # one collective: a rank that failed between two makes the other fail this late
DEADLINE_S = 300  # the whole run (about 20 s on two CPU cores)


# ------------------------------------------------------------------------------------------------ workers


def _cp(**degrees) -> ContextParallelConfig:
    """A context-parallel config over the two ranks on a CPU mesh (diffusers would build its mesh on the accelerator
    where there is one; the models here stay on the CPU)."""
    cp = ContextParallelConfig(**degrees)
    cp.mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    return cp


def _simulated_parallel(model, rank: int, cp: ContextParallelConfig) -> None:
    """A real parallel config recorded on the model as `enable_parallelism` records it, without its split hooks:
    the model runs its own shard, as each rank's blocks do."""
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(rank, WORLD, torch.device("cpu"), mesh=cp.mesh)
    model._parallel_config = config


def _poly_models(rank: int):
    """The whole polynomial model and this rank's half of its tokens. Block 0's quadratic term (what a first-order
    forecast misses) is small on rank 0's tokens and large on rank 1's: alone, the ranks would decide differently."""
    whole = pm.PolyModel(blocks=3, shape=(8, 4), seed=1)
    whole.blocks[0].coefficients[2, :4] *= 0.01
    half = pm.PolyModel(blocks=3, shape=(4, 4))
    for mine, full in zip(half.blocks, whole.blocks):
        mine.coefficients.copy_(full.coefficients[:, 4 * rank: 4 * rank + 4])
    return whole, half


def _poly_run(model, x) -> dict:
    with accel.patch(model, threshold=0.05, warmup_steps=2, first_block_order=1, last_block_order=1,
                     max_consecutive_predicted=3) as handle:
        run(model, x, steps=STEPS)
        stats = handle.stats()
    return {"predicted": stats["predicted_steps"], "errors": stats["gate_errors"]}


def _case_gate_error(rank: int) -> dict:
    """gate_error on this rank's tokens, alone and reduced, and on the whole sequence."""
    g = torch.Generator().manual_seed(0)
    actual = torch.randn(2, 16, 8, generator=g)
    noise = torch.randn(2, 16, 8, generator=g) * torch.where(torch.arange(16) < 8, 0.01, 1.0)[:, None]
    forecast = actual + noise
    mine = slice(8 * rank, 8 * rank + 8)
    return {"whole": gate_error(forecast, actual, "first"),
            "local": gate_error(forecast[:, mine], actual[:, mine], "first"),
            "reduced": gate_error(forecast[:, mine], actual[:, mine], "first", dist.group.WORLD)}


def _case_all_to_all(rank: int) -> dict:
    """Ulysses' exchanges on a known (B, N, H, D) tensor: this rank's tokens -> every token of its heads -> back, and
    the gradient through the first: the loss sum(heads * w) over both ranks has gradient w on every token."""
    b, n, h, d = 2, 6, 4, 3
    whole = torch.arange(b * n * h * d, dtype=torch.float64).reshape(b, n, h, d)
    weight = torch.randn(b, n, h, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tokens, heads = slice(rank * n // WORLD, (rank + 1) * n // WORLD), slice(rank * h // WORLD, (rank + 1) * h // WORLD)
    shard = whole[:, tokens].clone().requires_grad_()
    mine = _sequence_to_heads(shard, dist.group.WORLD, WORLD)
    (mine * weight[:, :, heads]).sum().backward()
    return {"to_heads": torch.equal(mine.detach(), whole[:, :, heads]),
            "round_trip": torch.equal(_heads_to_sequence(mine.detach(), dist.group.WORLD, WORLD), whole[:, tokens]),
            "gradient": torch.equal(shard.grad, weight[:, tokens])}


def _case_poly_decisions(rank: int) -> dict:
    pm.register()
    x = torch.randn(1, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole, half = _poly_models(rank)
    out = {"one_process": _poly_run(whole, x), "alone": _poly_run(half, x[:, 4 * rank: 4 * rank + 4])}
    for name, degree in (("ulysses", "ulysses_degree"), ("ring", "ring_degree")):
        _, half = _poly_models(rank)
        _simulated_parallel(half, rank, _cp(**{degree: WORLD}))
        out[name] = _poly_run(half, x[:, 4 * rank: 4 * rank + 4])
    return out


def _cg_taylor_runs(model, x, record_local: list | None = None) -> dict:
    """The fixed-schedule default, the gate, and the gate with CFG as two calls a step (the unconditional call
    follows the conditional one's decision and skips block 0 too); with `record_local`, each gated step's error on
    this rank's tokens alone is appended to it."""
    out = {}
    with accel.patch(model, method="cg_taylor", num_inference_steps=STEPS) as handle:
        out["fixed"], out["fixed_predicted"] = denoise(model, x, STEPS), handle.stats()["predicted_steps"]
    if record_local is not None:
        def recording(forecast, actual, cond_half=None, group=None):
            record_local.append(gate_error(forecast, actual, cond_half))
            return gate_error(forecast, actual, cond_half, group)

        cg_taylor.gate_error = recording
    try:
        with accel.patch(model, **GATE) as handle:
            out["gate"], stats = denoise(model, x, STEPS), handle.stats()
    finally:
        cg_taylor.gate_error = gate_error
    out["gate_predicted"], out["gate_errors"] = stats["predicted_steps"], stats["gate_errors"]
    with accel.patch(model, **GATE) as handle:
        out["gate_cfg"] = denoise(model, x, STEPS, contexts=("cond", "uncond"))
        out["gate_cfg_predicted"] = handle.stats()["predicted_steps"]
    return out


def _case_cg_taylor_ulysses(rank: int) -> dict:
    reference = tm.wan()
    x = tm.inputs(reference)
    out = {"one_process": _cg_taylor_runs(reference, x)}
    # Patched after enable_parallelism: CG-Taylor's hooks wrap diffusers' split of block 0's input.
    model = tm.wan()
    model.enable_parallelism(config=_cp(ulysses_degree=WORLD))
    local: list[float] = []
    out["parallel"] = _cg_taylor_runs(model, x, local)
    out["local_errors"] = local
    # Patched before: the split wraps CG-Taylor's hooks.
    model = tm.wan()
    with accel.patch(model, **GATE) as handle:
        model.enable_parallelism(config=_cp(ulysses_degree=WORLD))
        out["patched_first"] = denoise(model, x, STEPS)
        out["patched_first_predicted"] = handle.stats()["predicted_steps"]
    return out


def _sparse_forward(model, x, pattern: str | None) -> torch.Tensor:
    with torch.no_grad():
        if pattern is None:
            return model(**x, timestep=tm.timestep(model, 500.0), return_dict=False)[0]
        with accel.patch(model, method="sparse_attention", pattern=pattern):
            return model(**x, timestep=tm.timestep(model, 500.0), return_dict=False)[0]


def _case_sparse_ulysses(rank: int) -> dict:
    reference = tm.wan().to(torch.bfloat16)
    x = {k: v.to(torch.bfloat16) for k, v in tm.inputs(reference).items()}
    out = {"one_process": {name: _sparse_forward(reference, x, p) for name, p in [*SPARSE.items(), ("none", None)]}}
    model = tm.wan().to(torch.bfloat16)
    model.enable_parallelism(config=_cp(ulysses_degree=WORLD))
    out["parallel"] = {name: _sparse_forward(model, x, p) for name, p in [*SPARSE.items(), ("none", None)]}
    # Patched before parallelism was enabled; then removed: the original processors must run Ulysses again.
    model = tm.wan().to(torch.bfloat16)
    handle = accel.patch(model, method="sparse_attention", pattern=SPARSE["strided_shards"])
    model.enable_parallelism(config=_cp(ulysses_degree=WORLD))
    out["patched_first"] = _sparse_forward(model, x, None)
    state = model.blocks[0].attn1.processor.state
    out["kept_masks"] = {key[3]: mask.shape for key, mask in state.rank_masks.items()}  # head range -> (B', H')
    out["whole_masks"] = len(state.masks)
    handle.remove()
    out["restored"] = _sparse_forward(model, x, None)
    return out


def _error_of(call) -> str | None:
    try:
        call()
    except Exception as err:  # noqa: BLE001  (the message is the result)
        return f"{type(err).__name__}: {err}"
    return None


def _case_ring(rank: int) -> dict:
    x = tm.inputs(tm.wan())
    model = tm.wan()
    model.enable_parallelism(config=_cp(ring_degree=WORLD))
    out = {"sparse_after": _error_of(lambda: accel.patch(model, method="sparse_attention"))}
    model = tm.wan().to(torch.bfloat16)
    accel.patch(model, method="sparse_attention")
    model.enable_parallelism(config=_cp(ring_degree=WORLD))
    out["sparse_before"] = _error_of(lambda: _sparse_forward(model, {k: v.to(torch.bfloat16) for k, v in x.items()},
                                                              None))
    model = tm.wan()
    model.enable_parallelism(config=_cp(ring_degree=WORLD))
    runs: dict = {}
    out["cg_taylor_error"] = _error_of(lambda: runs.update(_cg_taylor_runs(model, x)))
    out["cg_taylor"] = runs
    out["one_process"] = _cg_taylor_runs(tm.wan(), x) if out["cg_taylor_error"] is None else None
    return out


CASES = {"all_to_all": _case_all_to_all, "gate_error": _case_gate_error, "poly_decisions": _case_poly_decisions,
         "cg_taylor_ulysses": _case_cg_taylor_ulysses, "sparse_ulysses": _case_sparse_ulysses, "ring": _case_ring}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    if torch.accelerator.device_count() == 0:  # diffusers' `rank % device_count()` (see the module docstring)
        torch.accelerator.device_count = lambda: 1
    # A timeout, so that a rank failing between collectives fails the other one too instead of hanging the run.
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results, failed = {}, None
    for name, case in CASES.items():
        if failed is not None:  # the ranks' collectives may no longer pair up: stop here
            results[name] = {"worker_error": f"not run: case {failed!r} failed first"}
            continue
        try:
            results[name] = case(rank)
        except Exception:  # noqa: BLE001  (reported by the test of that case)
            results[name], failed = {"worker_error": traceback.format_exc()}, name
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("context_parallel")
    # A worker's error outside the cases (the process group, a crash) is raised here with its traceback.
    workers = mp.start_processes(_worker, args=(str(work / "store"), str(work)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not workers.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} workers ran past {DEADLINE_S} s")
    finally:
        for process in workers.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _case(ranks: list[dict], name: str) -> list[dict]:
    """The case's results on every rank; its failure with every rank's error (a rank failing first makes the others
    fail in their next collective: the first error is not always the cause)."""
    errors = [f"rank {r}:\n{results[name]['worker_error']}" for r, results in enumerate(ranks)
              if "worker_error" in results[name]]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    return [results[name] for results in ranks]


def _same_on_every_rank(values: list) -> None:
    for value in values[1:]:
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, values[0])
        else:
            assert value == values[0]


def _errors_close(errors: list, expected: list, rel: float) -> None:
    """Gate errors (None where the gate was not asked) equal within `rel`."""
    assert [e is None for e in errors] == [e is None for e in expected]
    assert [e for e in errors if e is not None] == pytest.approx([e for e in expected if e is not None], rel=rel)


def test_diffusers_without_the_private_names_fails_at_import_with_them():
    class Bare:
        pass

    check_private_names({"ModelMixin": ModelMixin, "ContextParallelConfig": ContextParallelConfig})
    with pytest.raises(ImportError, match=r"private ContextParallelConfig\._flattened_mesh, "
                                          r"ContextParallelConfig\._ulysses_mesh \(context parallelism\)"):
        check_private_names({"ModelMixin": ModelMixin, "ContextParallelConfig": Bare})


def test_ulysses_exchanges_send_each_rank_its_heads_and_back(ranks):
    for case in _case(ranks, "all_to_all"):
        assert case == {"to_heads": True, "round_trip": True, "gradient": True}


def test_the_reduced_gate_error_is_the_whole_sequences_on_every_rank(ranks):
    cases = _case(ranks, "gate_error")
    _same_on_every_rank([c["reduced"] for c in cases])
    assert cases[0]["reduced"] == pytest.approx(cases[0]["whole"], rel=1e-6)
    assert cases[0]["local"] < 0.1 < cases[1]["local"]  # alone, the ranks are on either side of a threshold


def test_ranks_whose_own_errors_disagree_take_the_one_process_decisions(ranks):
    cases = _case(ranks, "poly_decisions")
    alone = [c["alone"]["predicted"] for c in cases]
    assert alone[0] != alone[1]  # without the reduction the ranks would diverge
    one_process = cases[0]["one_process"]
    assert 0 < len(one_process["predicted"]) < STEPS - 3
    for config in ("ulysses", "ring"):
        _same_on_every_rank([c[config] for c in cases])
        assert cases[0][config]["predicted"] == one_process["predicted"]
        _errors_close(cases[0][config]["errors"], one_process["errors"], rel=1e-9)


def test_cg_taylor_under_ulysses_equals_the_one_process_run(ranks):
    cases = _case(ranks, "cg_taylor_ulysses")
    for key in ("fixed", "gate", "gate_cfg", "fixed_predicted", "gate_predicted", "gate_cfg_predicted", "gate_errors"):
        _same_on_every_rank([c["parallel"][key] for c in cases])
    parallel, one_process = cases[0]["parallel"], cases[0]["one_process"]
    assert 0 < len(one_process["gate_predicted"]) < STEPS - 3 and one_process["fixed_predicted"]
    assert parallel["fixed_predicted"] == one_process["fixed_predicted"]
    assert parallel["gate_predicted"] == one_process["gate_predicted"]
    _errors_close(parallel["gate_errors"], one_process["gate_errors"], rel=1e-4)
    torch.testing.assert_close(parallel["fixed"], one_process["fixed"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parallel["gate"], one_process["gate"], rtol=1e-5, atol=1e-5)
    assert parallel["gate_cfg_predicted"] == one_process["gate_cfg_predicted"] and one_process["gate_cfg_predicted"]
    torch.testing.assert_close(parallel["gate_cfg"], one_process["gate_cfg"], rtol=1e-5, atol=1e-5)
    assert cases[0]["local_errors"] != cases[1]["local_errors"]  # each rank's own tokens tell a different error
    _same_on_every_rank([c["patched_first"] for c in cases])
    assert cases[0]["patched_first_predicted"] == one_process["gate_predicted"]
    torch.testing.assert_close(cases[0]["patched_first"], one_process["gate"], rtol=1e-5, atol=1e-5)


def test_sparse_attention_under_ulysses_equals_the_one_process_run(ranks):
    # The model runs in bf16 (the kernel's inputs), with fp32 inside: a float32 difference may move an output by one
    # bf16 step (2^-7 relative), no more. On this CPU the runs are in fact bitwise equal.
    close = dict(rtol=2**-7, atol=1e-2)
    cases = _case(ranks, "sparse_ulysses")
    one_process = cases[0]["one_process"]
    for name in [*SPARSE, "none"]:
        _same_on_every_rank([c["parallel"][name] for c in cases])
        torch.testing.assert_close(cases[0]["parallel"][name], one_process[name], **close)
        if name != "none":  # each pattern moves the output well past the tolerance: the comparison sees its masks
            assert (one_process[name].float() - one_process["none"].float()).abs().max() > 0.05
    _same_on_every_rank([c["patched_first"] for c in cases])
    torch.testing.assert_close(cases[0]["patched_first"], one_process["strided_shards"], **close)
    for rank, case in enumerate(cases):  # each rank keeps the mask of its one head (2 heads), not the whole mask
        assert case["kept_masks"] == {(rank, rank + 1): (1, 1)} and case["whole_masks"] == 0
    torch.testing.assert_close(cases[0]["restored"], one_process["none"], **close)


def test_sparse_attention_refuses_ring_attention(ranks):
    for case in _case(ranks, "ring"):
        for when in ("sparse_after", "sparse_before"):
            assert case[when] is not None and case[when].startswith("ValueError") and "ring" in case[when]
            assert "ulysses_degree" in case[when]


def test_cg_taylor_under_ring_attention_equals_the_one_process_run(ranks):
    cases = _case(ranks, "ring")
    error = cases[0]["cg_taylor_error"]
    if error is not None and RING_UNSUPPORTED in error:
        pytest.skip(f"diffusers' ring attention cannot run on the CPU: it needs the log-sum-exp that only CUDA/NPU "
                    f"attention backends return ({error.splitlines()[0]})")
    assert error is None, error
    _same_on_every_rank([c["cg_taylor"]["gate"] for c in cases])
    torch.testing.assert_close(cases[0]["cg_taylor"]["gate"], cases[0]["one_process"]["gate"], rtol=1e-5, atol=1e-5)
    assert cases[0]["cg_taylor"]["gate_predicted"] == cases[0]["one_process"]["gate_predicted"]
