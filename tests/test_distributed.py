"""tk.gram on a torch.distributed group: gloo on 2 and 3 CPU processes against one process.

Every rank runs a whole scenario in one spawn (starting W interpreters costs seconds);
the parent asserts on what each rank returned. With tiles of 4 rows and shards that are
multiples of 8 rows, the ranks' tiles are a single process's, so K must be bit-identical;
where shards cut tiles (cross kernels, uneven shares) K must agree to fp32 rounding.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tangent_kernels as tk
from tangent_kernels import reference
from tangent_kernels.distributed.schedule import cross_tasks, split_rows, symmetric_tasks, work

from _distributed import TILE_ROWS, error_of, mlp_problem, spawn, uneven_share
from _models import mlp

FP32 = dict(rtol=1e-5, atol=1e-6)


def _shard(k):
    return dict(rows=k.rows, row_start=k.row_start, row_stop=k.row_stop, shape=k.shape, offsets=k.row_offsets,
                symmetric=k.symmetric)


# ----------------------------------------------------------------------------- scenarios (run on every rank)


def main_scenario(rank: int, world: int):
    model, X, batches, batches2 = mlp_problem()
    out = {}
    for exchange in ("ring", "allgather"):
        for gather in ("all", "rank0", "rows"):
            k = tk.distributed.gram(model, batches, gather=gather, exchange=exchange, progress=False)
            out[f"sym-{exchange}-{gather}"] = _shard(k) if gather == "rows" else k
        out[f"cross-{exchange}"] = tk.distributed.gram(model, batches, loader2=batches2, exchange=exchange,
                                                       progress=False)
        out[f"cross-{exchange}-rows"] = _shard(tk.distributed.gram(model, batches, loader2=batches2,
                                                                   exchange=exchange, gather="rows", progress=False))
    shard = tk.gram(model, batches, gather="rows", progress=False)
    out["rows-gathered"] = shard.gather()
    out["rows-gathered-to-1"] = shard.gather(dst=1)
    out["dataloader"] = tk.gram(model, DataLoader(TensorDataset(X), batch_size=8), progress=False)
    out["drop-last"] = tk.gram(model, DataLoader(TensorDataset(X[:38]), batch_size=8, drop_last=True), progress=False)
    own, everything = uneven_share(rank, world)
    out["uneven"] = tk.gram(model, [own[:3], own[3:]], shard=True, progress=False)
    out["fp16"] = tk.gram(model, batches, precision="fp16", progress=False)
    out["bf16-disk"] = tk.gram(model, batches, precision="bf16", store="disk", progress=False)
    out["fp64"] = tk.gram(model, batches, precision="fp64", progress=False)
    scale = float(shard.gather().diagonal().mean())
    targets = torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
    betas = [0.1 * scale, scale]
    for solver in ("cg", "nesterov"):
        solution = tk.distributed.solve(shard, targets, betas, solver=solver, tol=1e-5, max_iter=3000)
        out[f"solve-{solver}"] = dict(coefs=solution.coefs, betas=solution.betas, converged=solution.converged,
                                      n_iter=solution.n_iter, targets=targets)
    out["operator"] = tk.distributed.KShardOperator(shard) @ targets
    out["operator-vector"] = tk.distributed.KShardOperator(shard) @ targets[:, 0]
    out["diagonal"] = tk.distributed.KShardOperator(shard).diagonal()
    if world == 3:  # a subgroup: group ranks 0, 1 are global ranks 1, 2 (every transfer maps them)
        import torch.distributed as dist

        pair = dist.new_group([1, 2])
        if rank in (1, 2):
            out["subgroup"] = tk.gram(model, batches, group=pair, progress=False)
            out["subgroup-rank0"] = tk.gram(model, batches, group=pair, gather="rank0", progress=False)
    if rank == 0:  # one process's K, with the same tiles, from features as the distributed path computes it
        out["single"] = tk.gram(model, batches, group=False, structured="never", progress=False)
        out["single-cross"] = tk.gram(model, batches, loader2=batches2, group=False, structured="never", progress=False)
        out["single-uneven"] = tk.gram(model, [everything], group=False, structured="never", progress=False)
        out["single-fp16"] = tk.gram(model, batches, precision="fp16", group=False, structured="never", progress=False)
        out["single-bf16"] = tk.gram(model, batches, precision="bf16", group=False, structured="never", progress=False)
    return out


class _Announcing:
    """A loader whose dataset's len() says ``announced`` samples (an IterableDataset's often errs)."""

    def __init__(self, batches, announced):
        self.batches, self.dataset = batches, range(announced)

    def __iter__(self):
        return iter(self.batches)


class _IterLoader:
    """A loader whose len() says 5 batches and that yields ``yields`` of them."""

    def __init__(self, batches, yields):
        self.batches, self.yields = batches, yields

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[:self.yields])


def errors_scenario(rank: int, world: int):
    model, X, batches, _ = mlp_problem()
    other = mlp()
    out = {}
    out["idx"] = error_of(lambda: tk.gram(model, batches, tk.subsample(model, 50, seed=rank), progress=False))
    out["weights"] = error_of(lambda: tk.gram(model if rank == 0 else other, batches, progress=False))
    out["precision"] = error_of(lambda: tk.gram(model, batches, precision="fp32" if rank == 0 else "fp64",
                                                 progress=False))
    out["output"] = error_of(lambda: tk.gram(model, batches, output="first" if rank == 0 else "sum", progress=False))
    out["batches"] = error_of(lambda: tk.gram(model, batches if rank == 0 else batches[:4], progress=False))
    out["structured"] = error_of(lambda: tk.gram(model, batches, structured="always", progress=False))
    out["gather"] = error_of(lambda: tk.gram(model, batches, gather="everyone", progress=False))
    # rank 1's dataset announces one sample more than it has
    own = X[rank * 10:rank * 10 + 10]
    out["announced"] = error_of(lambda: tk.gram(model, _Announcing(list(own.split(4)), 10 + rank), shard=True,
                                                 progress=False))
    out["short-loader"] = error_of(lambda: tk.gram(model, _IterLoader(batches, 3), progress=False))
    # after all those, the group still works
    out["after"] = tk.gram(model, batches, progress=False)
    return out


def timeout_scenario(rank: int, world: int):
    model, _, batches, _ = mlp_problem()

    def slow():  # rank 1 is stuck in its loader well past the timeout
        for b, batch in enumerate(batches):
            if rank == 1 and b == 0:
                time.sleep(5)
            yield batch

    class Slow:
        def __len__(self):
            return len(batches)

        def __iter__(self):
            return slow()

    return {"error": error_of(lambda: tk.distributed.gram(model, Slow(), timeout=1.5, progress=False))}


def kill_scenario(rank: int, world: int, folder: str, phase: str, victim: int):
    """Rank ``victim`` kills itself (SIGKILL) at its second event of ``phase``."""
    model, _, batches, _ = mlp_problem()
    seen = []

    def callback(event):
        if rank == victim and event.phase == phase:
            seen.append(event)
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    return {"error": error_of(lambda: tk.gram(model, batches, checkpoint=folder, callback=callback,
                                               progress=False))}


def resume_scenario(rank: int, world: int, folder: str):
    model, _, batches, _ = mlp_problem()
    resumed = []
    k = tk.gram(model, batches, checkpoint=folder, callback=lambda e: resumed.append(e.resumed), progress=False)
    return {"k": k, "resumed": sum(resumed), "fresh": tk.gram(model, batches, progress=False)}


def refused_scenario(rank: int, world: int, folder: str):
    model, _, batches, _ = mlp_problem()
    return {"error": error_of(lambda: tk.gram(model, batches, checkpoint=folder, progress=False))}


def _double(module, args, output):
    return output * 2


def rank_mismatch_scenario(rank: int, world: int):
    """The last rank differs from the others in one thing per call; every rank must refuse
    before any work, naming it (a K mixed from two computations is the alternative)."""
    model, X, batches, batches2 = mlp_problem()
    last = rank == world - 1
    out = {}

    def call(m=model, loader=batches, **kwargs):
        return error_of(lambda: tk.gram(m, loader, progress=False, **kwargs))

    changed = [b.clone() for b in batches]
    changed[3][0, 0] += 1
    out["data"] = call(loader=changed if last else batches)
    frozen = mlp_problem()[0]
    frozen[0].bias.requires_grad_(not last)
    out["requires_grad"] = call(m=frozen)
    out["inputs"] = call(inputs=(lambda b: b * 2) if last else None)
    out["loader2"] = call(loader2=batches2 if last else None)
    hooked = mlp_problem()[0]
    if last:
        hooked[2].register_forward_hook(_double)
    out["hook"] = call(m=hooked)
    gelu = mlp_problem()[0]
    gelu[3].approximate = "tanh" if last else "none"
    out["attribute"] = call(m=gelu)
    # each rank its own shuffle: other samples on each rank
    out["shuffle"] = call(loader=DataLoader(TensorDataset(X), batch_size=8, shuffle=True,
                                            generator=torch.Generator().manual_seed(rank)))
    # one seed on every rank, but another order at every pass over the loader
    out["reshuffle"] = call(loader=DataLoader(TensorDataset(X), batch_size=8, shuffle=True,
                                              generator=torch.Generator().manual_seed(0)))
    own, _ = uneven_share(rank, world)
    out["shard"] = tk.gram(model, [own], shard=True, progress=False)  # the data differ by design
    out["after"] = tk.gram(model, batches, progress=False)
    return out


def foreign_folder_scenario(rank: int, world: int, folder: str):
    model, _, batches, _ = mlp_problem()
    return {"error": error_of(lambda: tk.gram(model, batches, checkpoint=folder, progress=False))}


# ----------------------------------------------------------------------------- the schedule (no processes)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_schedule_covers_the_lower_triangle_once_and_balances(world):
    sizes = [16] * world
    counted = torch.zeros(16 * world, 16 * world, dtype=torch.int64)
    offsets = [16 * r for r in range(world + 1)]
    per_rank = []
    for rank in range(world):
        tasks = symmetric_tasks(rank, world, sizes, TILE_ROWS)
        per_rank.append(work(tasks, sizes))
        for t in tasks:
            assert rank in (t.row_shard, t.col_shard)  # computed from the rank's own shard and the visiting one
            r0 = offsets[t.row_shard] + t.row_start
            block = counted[r0:offsets[t.row_shard] + t.row_stop, offsets[t.col_shard]:offsets[t.col_shard + 1]]
            block += torch.ones_like(block).tril(r0 - offsets[t.col_shard]) if t.diagonal else 1
    assert torch.equal(counted, torch.ones_like(counted).tril())  # every lower entry exactly once
    assert max(per_rank) == min(per_rank)


def test_cross_schedule_covers_every_block_once():
    world, rows = 3, [4, 6, 5]
    blocks = sorted((t.row_shard, t.col_shard) for r in range(world) for t in cross_tasks(r, world, rows))
    assert blocks == [(a, b) for a in range(world) for b in range(world)]


def test_split_rows_falls_on_tiles():
    assert split_rows(24, 4) == 12 and split_rows(4096, 1024) == 2048 and split_rows(3000, 1024) == 1024
    assert split_rows(5, 4) == 2  # shorter than two tiles: the middle


# ----------------------------------------------------------------------------- on 2 and 3 processes


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def main_run(request, tmp_path_factory):
    world = request.param
    results = spawn(world, main_scenario, tmp_path_factory.mktemp(f"dist{world}"))
    for r, result in enumerate(results):
        assert result is not None and "error" not in result, f"rank {r}: {result}"
    return world, results


@pytest.mark.parametrize("exchange", ["ring", "allgather"])
def test_symmetric_K_is_the_single_process_K_in_every_gather_mode(main_run, exchange):
    world, results = main_run
    single = results[0]["single"]
    for r in range(world):
        torch.testing.assert_close(results[r][f"sym-{exchange}-all"], single, **FP32, msg=f"rank {r}")
    torch.testing.assert_close(results[0][f"sym-{exchange}-rank0"], single, **FP32)
    assert all(results[r][f"sym-{exchange}-rank0"] is None for r in range(1, world))
    shards = [results[r][f"sym-{exchange}-rows"] for r in range(world)]
    assert [s["row_start"] for s in shards] == list(shards[0]["offsets"][:-1])
    assert shards[-1]["offsets"][-1] == 40 and all(s["shape"] == (40, 40) and s["symmetric"] for s in shards)
    torch.testing.assert_close(torch.cat([s["rows"] for s in shards]), single, **FP32)


def test_a_subgroup_of_ranks(main_run):
    world, results = main_run
    if world != 3:
        pytest.skip("a proper subgroup needs 3 ranks: tested on the 3-rank run")
    assert "subgroup" not in results[0]  # global rank 0 is not in the group and computed nothing
    for r in (1, 2):
        torch.testing.assert_close(results[r]["subgroup"], results[0]["single"], **FP32)
    torch.testing.assert_close(results[1]["subgroup-rank0"], results[0]["single"], **FP32)
    assert results[2]["subgroup-rank0"] is None


def test_row_shards_gather_back(main_run):
    world, results = main_run
    single = results[0]["single"]
    for r in range(world):
        torch.testing.assert_close(results[r]["rows-gathered"], single, **FP32)
        assert (results[r]["rows-gathered-to-1"] is None) == (r != 1)
    torch.testing.assert_close(results[1]["rows-gathered-to-1"], single, **FP32)


@pytest.mark.parametrize("exchange", ["ring", "allgather"])
def test_cross_kernel(main_run, exchange):
    world, results = main_run
    single = results[0]["single-cross"]
    assert single.shape == (40, 13)
    for r in range(world):
        torch.testing.assert_close(results[r][f"cross-{exchange}"], single, **FP32)
    shards = [results[r][f"cross-{exchange}-rows"] for r in range(world)]
    assert not shards[0]["symmetric"] and shards[0]["shape"] == (40, 13)
    torch.testing.assert_close(torch.cat([s["rows"] for s in shards]), single, **FP32)


def test_dataloader_fp16_bf16_disk_store_and_fp64(main_run):
    world, results = main_run
    model, _, batches, _ = mlp_problem()
    for r in range(world):
        torch.testing.assert_close(results[r]["dataloader"], results[0]["single"], **FP32)
        torch.testing.assert_close(results[r]["drop-last"], results[0]["single"][:32, :32], **FP32)  # 4 whole batches of 8
        torch.testing.assert_close(results[r]["fp16"], results[0]["single-fp16"], **FP32)
        torch.testing.assert_close(results[r]["bf16-disk"], results[0]["single-bf16"], **FP32)
        assert results[r]["fp64"].dtype == torch.float64
    # fp64 against the float64 per-sample autograd loop, independent of the engine
    torch.testing.assert_close(results[0]["fp64"], reference.gram_autograd(model, batches), rtol=1e-10, atol=1e-12)


def test_uneven_shares_with_shard_true(main_run):
    world, results = main_run
    single = results[0]["single-uneven"]
    assert single.shape[0] == sum(5 + 3 * r for r in range(world))
    for r in range(world):
        torch.testing.assert_close(results[r]["uneven"], single, **FP32)
        assert torch.equal(results[r]["uneven"], results[r]["uneven"].T)  # exactly symmetric


def test_clear_errors(tmp_path):
    results = spawn(2, errors_scenario, tmp_path)
    for r, result in enumerate(results):
        assert result is not None and "error" not in result, f"rank {r}: {result}"
        assert "DistributedMismatch" in result["idx"] and "idx" in result["idx"]
        assert "model_weights" in result["weights"] and "rank 1" in result["weights"]
        assert "precision: rank 0 has 'fp32', rank 1 has 'fp64'" in result["precision"]
        assert "batches: rank 0 has [5], rank 1 has [4]" in result["batches"]
        assert "output: rank 0 has 'first', rank 1 has 'sum'" in result["output"]
        assert "gather must be one of" in result["gather"]
        assert "structured='always' is not supported by the distributed Gram yet" in result["structured"]
        assert "rank 2" not in result["short-loader"] and "yields 3 batches but announced 5" in result["short-loader"]
        assert result["after"].shape == (40, 40)
    assert "rank 1: loader yields 10 samples but announced 11" in results[1]["announced"]
    assert "RankFailed: rank 1 failed in phase 'features'" in results[0]["announced"]


def test_ranks_that_differ_are_refused_before_any_work_naming_what_and_which(tmp_path):
    results = spawn(2, rank_mismatch_scenario, tmp_path)
    for r, result in enumerate(results):
        assert result is not None and "error" not in result, f"rank {r}: {result}"
        for case in ("data", "requires_grad", "inputs", "loader2", "hook", "attribute", "shuffle"):
            assert result[case] is not None and result[case].startswith("DistributedMismatch"), (case, result[case])
            assert "rank 1 differs from rank 0" in result[case], (case, result[case])
        assert "data (loader): batch 3: rank 0 has #" in result["data"]
        assert "0.bias: rank 0 has requires_grad=True, rank 1 has requires_grad=False" in result["requires_grad"]
        assert "inputs: rank 0 has None" in result["inputs"]
        assert "kernel: rank 0 has 'symmetric K(X, X)', rank 1 has 'cross K(X1, X2)'" in result["loader2"]
        assert "2: forward hooks: rank 0 has (nothing), rank 1 has #" in result["hook"]
        assert "3.approximate: rank 0 has 'none', rank 1 has 'tanh'" in result["attribute"]
        assert "data (loader): batch 0" in result["shuffle"]
        assert "differs from the one the ranks compared before the run" in result["reshuffle"]
        assert result["shard"].shape == (5 + 8, 5 + 8)
        assert result["after"].shape == (40, 40)


def test_a_folder_the_library_did_not_write_is_refused_by_every_rank(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for result in spawn(2, foreign_folder_scenario, tmp_path, str(folder)):
        assert "CheckpointMismatch" in result["error"] and "not written by tangent_kernels" in result["error"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


@pytest.mark.slow  # rank 1 sleeps 5 s past the timeout
def test_a_stuck_rank_is_named_with_its_phase(tmp_path):
    results = spawn(2, timeout_scenario, tmp_path, pg_timeout=10)
    message = results[0]["error"]
    # the loader is first read in the arguments phase: the ranks compare its batches before any work
    assert "DistributedTimeout" in message and "'arguments'" in message and "1" in message, message


# ----------------------------------------------------------------------------- checkpoints per rank


@pytest.mark.slow  # three launches, one waiting for the group's 5 s timeout
@pytest.mark.parametrize("phase,victim", [("gram", 1), ("features", 0)])
def test_sigkill_of_a_rank_then_relaunch_resumes_to_the_same_bits(tmp_path, phase, victim):
    folder = str(tmp_path / "ckpt")
    killed = spawn(2, kill_scenario, tmp_path, folder, phase, victim, pg_timeout=5)
    assert killed[victim] is None  # it died without a result
    survivor = killed[1 - victim]
    assert survivor is not None and survivor["error"] is not None  # the other rank stopped with an error
    resumed = spawn(2, resume_scenario, tmp_path, folder)
    for r in range(2):
        assert resumed[r] is not None and "error" not in resumed[r], resumed[r]
        assert resumed[r]["resumed"] > 0  # finished work was read back, not recomputed
        assert torch.equal(resumed[r]["k"], resumed[r]["fresh"])
    if phase == "gram":  # a relaunch on another number of ranks: refused, saying why (tested once)
        refused = spawn(3, refused_scenario, tmp_path, folder)
        for r in range(3):
            assert "CheckpointMismatch" in refused[r]["error"] and "on 2 ranks, this one has 3" in refused[r]["error"]


# ----------------------------------------------------------------------------- solvers on row shards


@pytest.mark.parametrize("solver", ["cg", "nesterov"])
def test_sharded_solvers_match_the_gathered_solve(main_run, solver):
    world, results = main_run
    K = results[0]["single"].double()
    first = results[0][f"solve-{solver}"]
    targets = first["targets"].double()
    torch.testing.assert_close(results[0]["operator"], results[0]["single"] @ first["targets"], **FP32)
    torch.testing.assert_close(results[-1]["operator-vector"], results[0]["single"] @ first["targets"][:, 0], **FP32)
    torch.testing.assert_close(results[-1]["diagonal"], results[0]["single"].diagonal(), **FP32)
    for beta, coefs, converged in zip(first["betas"], first["coefs"], first["converged"]):
        assert converged, first["n_iter"]
        exact = torch.linalg.solve(K + beta * torch.eye(40, dtype=torch.float64), targets)
        residual = (K @ coefs.double() + beta * coefs.double() - targets).norm() / targets.norm()
        assert residual < 3e-5  # the solver's tol (1e-5), measured in float64
        torch.testing.assert_close(coefs.double(), exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))
    gathered = tk.solve(results[0]["single"], first["targets"], first["betas"], solver=solver, tol=1e-5,
                        max_iter=3000)
    torch.testing.assert_close(first["coefs"], gathered, rtol=1e-3, atol=1e-4 * float(gathered.abs().max()))
    for r in range(1, world):  # the same coefficients on every rank
        assert torch.equal(results[r][f"solve-{solver}"]["coefs"], first["coefs"])
        assert results[r][f"solve-{solver}"]["n_iter"] == first["n_iter"]


def test_a_model_with_0d_buffers_is_fingerprinted(tmp_path):
    """BatchNorm's num_batches_tracked is a 0-d tensor: the ranks' agreement check and
    every checkpoint hash the model's buffers (this once raised for any BatchNorm model)."""
    from _models import cnn, cnn_input

    torch.manual_seed(0)
    model, X = cnn(), cnn_input(6)
    resumable = tk.gram(model, [X], checkpoint=str(tmp_path / "ckpt"), progress=False)
    torch.testing.assert_close(resumable, reference.gram_autograd(model, [X]).float(), rtol=1e-4, atol=1e-5)


def test_split_options_without_a_process_group_are_refused():
    model, _, batches, _ = mlp_problem()
    with pytest.raises(ValueError, match="no torch.distributed process group is initialized"):
        tk.gram(model, batches, shard=True, progress=False)
    with pytest.raises(ValueError, match="no torch.distributed process group is initialized"):
        tk.gram(model, batches, gather="rows", progress=False)
    with pytest.raises(ValueError, match="group=False computes K in this process alone"):
        tk.gram(model, batches, group=False, gather="rank0", progress=False)
    # no group, default options: the single-process K, against the float64 loop
    torch.testing.assert_close(tk.gram(model, batches, progress=False), reference.gram_autograd(model, batches).float(),
                               rtol=1e-5, atol=1e-6)
