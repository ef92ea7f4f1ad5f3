"""The torch.func NTK tutorial's two methods against our drop-in adapter, in one run; then
the TRAK, laplace-torch and LM-Kernel-FT adapters against the code they replace.

    python bench/bench_compat.py [--n 64] [--resnet-n 16] [--margin 3] [--skip-tutorial]
                                 [--skip-adapters] [--threads N] [--json out.json]

compute="full" (k = 10 outputs), every parameter, float32, CPU: the tutorial's CNN on
32x32 inputs (its `CNN`: three 3x3 convolutions of 32 channels and a linear head) at n
samples, and torchvision resnet18 at 32x32 at --resnet-n samples (the tutorial's Jacobian
contraction holds n x k x 11.2M floats: n = 64 would need 28 GB). Asserts our adapter is
>= --margin times faster than the faster tutorial method on each model, with K agreeing.

Adapters (float32, CPU, best of 3, each against the original on the same model and data):
TRAK's per-sample margin gradients over every parameter of the tutorial CNN (ours vs its
FunctionalGradientComputer: the same [n, P] gradients, so no speed margin is asserted, only
agreement), and at a 2048-coordinate subsample (TRAK computes every entry and indexes);
laplace-torch's Jacobians on a 2000-entry subnetwork of the tutorial CNN (ours
vs its torch.func ``jacobians``, which forms all P columns and then indexes them);
LM-Kernel-FT's "sgd" kernel [n, C, n, C] of a small prompt-style masked LM (ours vs its
jacrev + vmap(vmap(jvp)) computation as published). Asserts agreement <= 1e-4 for all and
>= --adapter-margin times the original for the subsample, laplace-torch and LM-Kernel-FT.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from _common import commit
from tangent_kernels.compat import torch_func


class CNN(nn.Module):  # the tutorial's
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def jacobian_contraction(fnet_single, params, x1, x2):  # the tutorial's, compute="full"
    jac1 = [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x1).values()]
    jac2 = [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x2).values()]
    return torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)


def ntk_vps(func, params, x1, x2):  # the tutorial's, compute="full"
    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    return vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(name, net, x, skip_vps=False):
    net.eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x[:2], x[:2], "full")  # warm-up
    t_ours, ours = timed(lambda: torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x, x, "full"))
    t_jac, jac = timed(lambda: jacobian_contraction(fnet_single, params, x, x))
    result = {"n": x.shape[0], "ours_s": t_ours, "jacobian_contraction_s": t_jac,
              "agreement": float((ours - jac).norm() / jac.norm())}
    if not skip_vps:
        t_vps, vps = timed(lambda: ntk_vps(fnet_single, params, x, x))
        result["ntk_vps_s"] = t_vps
    best = min(v for k, v in result.items() if k in ("jacobian_contraction_s", "ntk_vps_s"))
    result["speedup_vs_faster_tutorial"] = best / t_ours
    print(f"{name} n={x.shape[0]}: ours {t_ours:.3f} s, jacobian contraction {t_jac:.3f} s"
          + (f", ntk-vps {result['ntk_vps_s']:.3f} s" if "ntk_vps_s" in result else "")
          + f"; {result['speedup_vs_faster_tutorial']:.1f}x the faster; K agreement {result['agreement']:.1e}")
    return result


def best_of(fn, repeats=3):
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        seconds, result = timed(fn)
        times.append(seconds)
    return min(times), result


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def bench_trak(n):
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.modelout_functions import ImageClassificationModelOutput

    from tangent_kernels.compat.trak import GradientComputer

    net, task = CNN().eval(), ImageClassificationModelOutput()
    batch = (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    flat = lambda g: torch.cat([v.detach().flatten(1) for v in g.values()], 1)  # noqa: E731
    # Constructed once, as TRAKer does; the warm-up call makes the first-batch decisions.
    computer = GradientComputer(net, task, None, torch.float32, "cpu")
    t_ours, ours = best_of(lambda: computer.compute_per_sample_grad(batch))
    trak = FunctionalGradientComputer(net, task, None, torch.float32, "cpu")
    t_trak, theirs = best_of(lambda: trak.compute_per_sample_grad(batch))
    return {"n": n, "ours_s": t_ours, "original_s": t_trak, "agreement": rel(flat(ours), flat(theirs))}


def bench_trak_subsample(n, p=2048):
    """The same, for the gradients' entries at a uniform subsample of p coordinates: TRAK
    can only compute every entry and index them."""
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.modelout_functions import ImageClassificationModelOutput

    import tangent_kernels as tk
    from tangent_kernels.compat.trak import GradientComputer

    net, task = CNN().eval(), ImageClassificationModelOutput()
    batch = (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    idx = tk.subsample(net, p, seed=0)
    computer = GradientComputer.subsampled(idx)(net, task, None, torch.float32, "cpu")
    t_ours, ours = best_of(lambda: computer.compute_per_sample_grad(batch))
    trak = FunctionalGradientComputer(net, task, None, torch.float32, "cpu")
    def every():
        return torch.cat([v.detach().flatten(1) for v in trak.compute_per_sample_grad(batch).values()], 1)

    t_trak, theirs = best_of(lambda: every()[:, idx.positions])
    return {"n": n, "p": p, "ours_s": t_ours, "original_s": t_trak, "agreement": rel(ours, theirs)}


def bench_laplace(n, p=2000):
    from laplace.curvature import CurvatureInterface, GGNInterface

    from tangent_kernels.compat.laplace import TangentKernelsGGN

    net, x = CNN().eval(), torch.randn(n, 3, 32, 32)
    indices = torch.randperm(sum(q.numel() for q in net.parameters()))[:p].sort().values
    ours = TangentKernelsGGN(net, "classification", subnetwork_indices=indices)
    t_ours, (js, _) = best_of(lambda: ours.jacobians(x))
    theirs = GGNInterface(net, "classification", subnetwork_indices=indices)
    t_theirs, (js_theirs, _) = best_of(lambda: CurvatureInterface.jacobians(theirs, x))
    return {"n": n, "p": p, "ours_s": t_ours, "original_s": t_theirs, "agreement": rel(js, js_theirs)}


class PromptMLM(nn.Module):  # LM-Kernel-FT's model signature, (logits,) at the mask
    def __init__(self, vocab=2000, d=64, labels=2):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.up, self.down, self.head = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, mask_pos=None, labels=None):
        h = self.embed(input_ids)
        h = self.norm(h + self.down(F.relu(self.up(h)))) * attention_mask.unsqueeze(-1)
        return (self.head(h[torch.arange(h.size(0)), mask_pos.squeeze()]),)


def lm_kernel_ft_published(wrapper, loader):
    """LM-Kernel-FT's compute_kernel_outer/inner for kernel_formula="sgd"."""
    params = {k: v.detach() for k, v in wrapper.named_parameters()}

    def model_fn(p, b):
        return functional_call(wrapper, p, (b["input_ids"], b["attention_mask"], b["mask_pos"]))

    rows = []
    for outer in loader:
        grads_outer = jacrev(model_fn)(params, outer)
        blocks = [vmap(vmap(lambda t: jvp(lambda p: model_fn(p, inner), (params,), (t,))[1]))(grads_outer).double()
                  for inner in loader]
        rows.append(torch.cat(blocks, dim=2))
    return torch.cat(rows, dim=0)


def bench_lm_kernel_ft(n, T=32):
    from torch.utils.data import DataLoader

    from tangent_kernels.compat import lm_kernel_ft

    rows = [{"input_ids": torch.randint(0, 2000, (T,)), "attention_mask": torch.ones(T),
             "mask_pos": torch.randint(0, T, (1,)), "labels": torch.tensor(1)} for _ in range(n)]
    model = PromptMLM().eval()
    t_ours, ours = best_of(lambda: lm_kernel_ft.compute_kernel(model, DataLoader(rows, batch_size=8)))
    wrapper = lm_kernel_ft.LogitModel(model).eval()
    t_theirs, theirs = best_of(lambda: lm_kernel_ft_published(wrapper, DataLoader(rows, batch_size=8)))
    return {"n": n, "ours_s": t_ours, "original_s": t_theirs, "agreement": rel(ours, theirs)}


def run_adapters(n):
    results = {}
    for name, bench, size in (("trak", bench_trak, n), ("trak_subsample", bench_trak_subsample, n),
                              ("laplace", bench_laplace, 16),
                              ("lm_kernel_ft", bench_lm_kernel_ft, 32)):
        result = results[name] = bench(size)
        result["speedup"] = result["original_s"] / result["ours_s"]
        print(f"{name} n={result['n']}: ours {result['ours_s']:.3f} s, original {result['original_s']:.3f} s; "
              f"{result['speedup']:.1f}x; agreement {result['agreement']:.1e}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--resnet-n", type=int, default=16)
    parser.add_argument("--margin", type=float, default=3.0)
    parser.add_argument("--skip-vps", action="store_true", help="skip the tutorial's NTK-vector-product method")
    parser.add_argument("--skip-tutorial", action="store_true", help="only the TRAK/laplace/LM-Kernel-FT adapters")
    parser.add_argument("--skip-adapters", action="store_true", help="only the torch.func tutorial's methods")
    parser.add_argument("--adapter-margin", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 keeps timings stable on a shared machine")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    report = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "commit": commit()}
    failed = []
    if not args.skip_tutorial:
        import torchvision

        report["cnn"] = run("tutorial CNN", CNN(), torch.randn(args.n, 3, 32, 32), args.skip_vps)
        report["resnet18"] = run("resnet18", torchvision.models.resnet18(num_classes=10),
                                 torch.randn(args.resnet_n, 3, 32, 32), skip_vps=True)
        failed += [f"{k}: {report[k]['speedup_vs_faster_tutorial']:.2f}x (margin {args.margin}), agreement "
                   f"{report[k]['agreement']:.1e}" for k in ("cnn", "resnet18")
                   if report[k]["speedup_vs_faster_tutorial"] < args.margin or report[k]["agreement"] > 1e-4]
    if not args.skip_adapters:
        report["adapters"] = adapters = run_adapters(args.n)
        failed += [f"{k}: agreement {v['agreement']:.1e}" for k, v in adapters.items() if v["agreement"] > 1e-4]
        failed += [f"{k}: {adapters[k]['speedup']:.2f}x (margin {args.adapter_margin})"
                   for k in ("trak_subsample", "laplace", "lm_kernel_ft")
                   if adapters[k]["speedup"] < args.adapter_margin]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    for failure in failed:
        print(f"FAILED: {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
