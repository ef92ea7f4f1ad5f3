"""tk.gram(..., projection=tk.Projection(...)) on a torch.distributed group (gloo, 2 and 3
CPU processes): every rank sketches its samples with the same R (a function of the seed),
so the distributed sketched K is the one-process sketched K, to fp32 (fp64) rounding, for
the dense and the Kronecker kinds, every gather mode, shard=True and the cross kernel; the
projection is in what the ranks compare and in each rank's checkpoint identity."""

from __future__ import annotations

import pytest
import torch

import tangent_kernels as tk

from _distributed import error_of, mlp_problem, spawn, uneven_share

FP32 = dict(rtol=1e-5, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)
KINDS = ("gaussian", "kronecker")


def sketch_scenario(rank: int, world: int, folder: str):
    model, X, batches, batches2 = mlp_problem()
    own, everything = uneven_share(rank, world)
    out = {}
    for kind in KINDS:
        projection = tk.Projection(64, kind, seed=3)
        out[f"{kind}-all"] = tk.gram(model, batches, projection=projection, progress=False)
        out[f"{kind}-allgather"] = tk.distributed.gram(model, batches, projection=projection, exchange="allgather",
                                                       progress=False)
        rows = tk.gram(model, batches, projection=projection, gather="rows", progress=False)
        out[f"{kind}-rows"] = rows.rows
        out[f"{kind}-shard"] = tk.gram(model, [own[:3], own[3:]], shard=True, projection=projection, progress=False)
        out[f"{kind}-cross"] = tk.gram(model, batches, loader2=batches2, projection=projection, progress=False)
        out[f"{kind}-fp64"] = tk.gram(model, batches, projection=projection, precision="fp64", progress=False)
        if rank == 0:  # one process, the same seed
            single = dict(group=False, projection=projection, progress=False)
            out[f"{kind}-single"] = tk.gram(model, batches, **single)
            out[f"{kind}-single-uneven"] = tk.gram(model, [everything], **single)
            out[f"{kind}-single-cross"] = tk.gram(model, batches, loader2=batches2, **single)
            out[f"{kind}-single-fp64"] = tk.gram(model, batches, precision="fp64", **single)
    projection = tk.Projection(64, "gaussian", seed=3)
    out["seeds"] = error_of(lambda: tk.gram(model, batches, projection=tk.Projection(64, seed=rank), progress=False))
    out["always"] = error_of(lambda: tk.gram(model, batches, projection=projection, structured="always",
                                              progress=False))
    resumed = []
    out["ckpt-first"] = tk.gram(model, batches, projection=projection, checkpoint=folder, progress=False)
    out["ckpt-resumed"] = tk.gram(model, batches, projection=projection, checkpoint=folder, progress=False,
                                  callback=lambda e: resumed.append(e.resumed))
    out["ckpt-resumed-events"] = sum(resumed)
    out["ckpt-other-seed"] = error_of(lambda: tk.gram(model, batches, projection=tk.Projection(64, seed=4),
                                                       checkpoint=folder, progress=False))
    out["ckpt-none"] = error_of(lambda: tk.gram(model, batches, checkpoint=folder, progress=False))
    out["after"] = tk.gram(model, batches, progress=False)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def sketch_run(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"sketch{world}")
    results = spawn(world, sketch_scenario, tmp, str(tmp / "ckpt"))
    for r, result in enumerate(results):
        assert result is not None and "error" not in result, f"rank {r}: {result}"
    return world, results


@pytest.mark.parametrize("kind", KINDS)
def test_sketched_K_is_the_single_process_sketched_K(sketch_run, kind):
    world, results = sketch_run
    single = results[0][f"{kind}-single"]
    assert single.shape == (40, 40)
    for r in range(world):
        torch.testing.assert_close(results[r][f"{kind}-all"], single, **FP32, msg=f"rank {r}")
        torch.testing.assert_close(results[r][f"{kind}-allgather"], single, **FP32, msg=f"rank {r}")
        torch.testing.assert_close(results[r][f"{kind}-cross"], results[0][f"{kind}-single-cross"], **FP32)
        assert results[r][f"{kind}-fp64"].dtype == torch.float64
        torch.testing.assert_close(results[r][f"{kind}-fp64"], results[0][f"{kind}-single-fp64"], **FP64)
    torch.testing.assert_close(torch.cat([results[r][f"{kind}-rows"] for r in range(world)]), single, **FP32)
    # a sketch, not the exact K (which the seed-averaged sketch estimates)
    exact = tk.gram(mlp_problem()[0], mlp_problem()[2], group=False, progress=False)
    assert not torch.allclose(single, exact, **FP32)


@pytest.mark.parametrize("kind", KINDS)
def test_sketched_K_with_shard_true(sketch_run, kind):
    world, results = sketch_run
    single = results[0][f"{kind}-single-uneven"]
    assert single.shape[0] == sum(5 + 3 * r for r in range(world))
    for r in range(world):
        torch.testing.assert_close(results[r][f"{kind}-shard"], single, **FP32)


def test_projection_in_the_ranks_agreement_and_the_checkpoint(sketch_run):
    world, results = sketch_run
    for r in range(world):
        result = results[r]
        assert "DistributedMismatch" in result["seeds"] and "projection: rank 0 has 'gaussian dim=64 seed=0" \
            in result["seeds"], result["seeds"]
        assert "structured='always'" in result["always"], result["always"]
        assert torch.equal(result["ckpt-resumed"], result["ckpt-first"])
        assert result["ckpt-resumed-events"] > 0  # read back, not recomputed
        for case in ("ckpt-other-seed", "ckpt-none"):
            assert "CheckpointMismatch" in result[case] and "projection" in result[case], (case, result[case])
        assert result["after"].shape == (40, 40)
