"""The torch.func NTK tutorial's two methods against our drop-in adapter, in one run.

    python bench/bench_compat.py [--n 64] [--resnet-n 16] [--margin 3] [--json out.json]

compute="full" (k = 10 outputs), every parameter, float32, CPU: the tutorial's CNN on
32x32 inputs (its `CNN`: three 3x3 convolutions of 32 channels and a linear head) at n
samples, and torchvision resnet18 at 32x32 at --resnet-n samples (the tutorial's Jacobian
contraction holds n x k x 11.2M floats: n = 64 would need 28 GB). Asserts our adapter is
>= --margin times faster than the faster tutorial method on each model, with K agreeing.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--resnet-n", type=int, default=16)
    parser.add_argument("--margin", type=float, default=3.0)
    parser.add_argument("--skip-vps", action="store_true", help="skip the tutorial's NTK-vector-product method")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torchvision

    torch.manual_seed(0)
    report = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "commit": commit()}
    report["cnn"] = run("tutorial CNN", CNN(), torch.randn(args.n, 3, 32, 32), args.skip_vps)
    report["resnet18"] = run("resnet18", torchvision.models.resnet18(num_classes=10),
                             torch.randn(args.resnet_n, 3, 32, 32), skip_vps=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    failed = [k for k in ("cnn", "resnet18") if report[k]["speedup_vs_faster_tutorial"] < args.margin
              or report[k]["agreement"] > 1e-4]
    for name in failed:
        print(f"FAILED: {name}: {report[name]['speedup_vs_faster_tutorial']:.2f}x (margin {args.margin}), "
              f"agreement {report[name]['agreement']:.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
