"""Real architectures at several batch sizes: every tensor's fp32 features against the
float64 reference (issue #20's "look for more of each class yourself").

For each model (random weights, small inputs) and batch size, the loader cuts the same n
samples into batches of that size; tk.features in fp32 is compared with
tk.reference.features_autograd (float64, each sample alone), tensor by tensor, relative to
each tensor's own norm, and K = F F^T against the reference K. A tensor off by more than
--tolerance is listed. Warnings (generic paths taken, the per-batch check's findings) are
counted and shown. Not a unit test: minutes of CPU.

    python bench/sweep_trust.py [--n 16] [--batch-sizes 1,3,8,16] [--params 3000] [--only swin,bert] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import tangent_kernels as tk
from _common import commit


def _torchvision():
    import torchvision.models as tv

    yield "tv resnet18", lambda: tv.resnet18(num_classes=10), (3, 32, 32)
    yield "tv mobilenet_v3_small", lambda: tv.mobilenet_v3_small(num_classes=10), (3, 32, 32)
    yield "tv swin_t (16-token windows)", lambda: tv.swin_t(num_classes=10), (3, 64, 64)
    yield "tv vit (2 layers)", lambda: tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                              hidden_dim=32, mlp_dim=64, num_classes=10), (3, 32, 32)
    yield "tv densenet memory_efficient", lambda: tv.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8,
                                                              bn_size=2, num_classes=10, memory_efficient=True), (3, 32, 32)
    yield "tv convnext_tiny", lambda: tv.convnext_tiny(num_classes=10), (3, 32, 32)
    yield "tv efficientnet_b0", lambda: tv.efficientnet_b0(num_classes=10), (3, 32, 32)
    yield "tv shufflenet_v2_x0_5", lambda: tv.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32)
    yield "tv regnet_y_400mf", lambda: tv.regnet_y_400mf(num_classes=10), (3, 32, 32)


def _timm():
    import timm

    yield "timm vit_tiny", lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                                     num_classes=10), (3, 32, 32)
    yield "timm xcit_nano_12_p16", lambda: timm.create_model("xcit_nano_12_p16_224", img_size=64, depth=2,
                                                             num_classes=10), (3, 64, 64)
    yield "timm levit_128s", lambda: timm.create_model("levit_128s", img_size=64, num_classes=10), (3, 64, 64)
    yield "timm swin_tiny (window 4)", lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64,
                                                                 window_size=4, depths=(1, 1, 1, 1),
                                                                 num_classes=10), (3, 64, 64)
    yield "timm convnext_atto", lambda: timm.create_model("convnext_atto", num_classes=10), (3, 32, 32)
    yield "timm mixer", lambda: timm.create_model("mixer_s16_224", img_size=32,
                                                             num_classes=10), (3, 32, 32)


def _transformers():
    import transformers as hf

    def bert():
        cfg = hf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, num_labels=3)
        return hf.BertForSequenceClassification(cfg)

    def gpt2():
        cfg = hf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        return hf.GPT2LMHeadModel(cfg)

    def t5():
        cfg = hf.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return hf.T5EncoderModel(cfg)

    def distilbert():
        cfg = hf.DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3)
        return hf.DistilBertForSequenceClassification(cfg)

    def hf_vit():
        cfg = hf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, num_labels=3)
        return hf.ViTForImageClassification(cfg)

    yield "hf bert", bert, ("tokens", 97, 16)
    yield "hf distilbert", distilbert, ("tokens", 97, 16)
    yield "hf vit", hf_vit, (3, 32, 32)
    yield "hf gpt2 (last token)", gpt2, ("tokens", 97, 16)
    yield "hf t5 encoder", t5, ("tokens", 97, 16)


def _output_for(name):
    if "gpt2" in name:
        return lambda out: out.logits[:, -1, 0]
    if "t5" in name:
        return lambda out: out.last_hidden_state[:, 0, 0]
    return "first"


def models(only):
    for family in (_torchvision, _timm, _transformers):
        try:
            for name, make, shape in family():
                if not only or any(key in name for key in only):
                    yield name, make, shape
        except ImportError as missing:
            print(f"skipped a family: {missing}")


def inputs(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if shape[0] == "tokens":
        return torch.randint(0, shape[1], (n, shape[2]), generator=g)
    return torch.randn(n, *shape, generator=g)


def per_tensor_errors(index, got, expected):
    """Each tensor's ||got - expected|| over its own norm; a tensor whose exact gradient is
    (near) zero, as an attention key bias's (softmax ignores a constant shift), is judged
    against 1e-6 of the whole gradient's norm instead: its relative error is fp32 noise."""
    floor = 1e-6 * float(expected.norm())
    errors = {}
    for piece in index.tensor_slices:
        a, b = got[:, piece.columns].double(), expected[:, piece.columns]
        errors[piece.name] = float((a - b).norm()) / max(float(b.norm()), floor, 1e-300)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,3,8,16")
    parser.add_argument("--params", type=int, default=3000)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--only", default="")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    only = [s for s in args.only.split(",") if s]
    print(f"commit {commit()}, torch {torch.__version__}, n = {args.n}, batch sizes {sizes}, p = {args.params}")
    rows = []
    for name, make, shape in models(only):
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            model = make().eval()
            with torch.no_grad():  # zero-initialized heads (timm) would leave most gradients exactly zero
                g = torch.Generator().manual_seed(2)
                for parameter in model.parameters():
                    if parameter.is_floating_point() and not parameter.any():
                        parameter.copy_(0.02 * torch.randn(parameter.shape, generator=g))
            x = inputs(shape, args.n)
            idx = tk.subsample(model, min(args.params, sum(p.numel() for p in model.parameters())), seed=1)
            output = _output_for(name)
            reference = tk.reference.features_autograd(model, [x], idx, output=output)
            k_ref = reference @ reference.T
        except Exception as error:  # noqa: BLE001 - a sweep reports and goes on
            print(f"{name:32s} reference failed: {type(error).__name__}: {str(error)[:200]}")
            rows.append(dict(model=name, error=f"reference: {type(error).__name__}: {error}"))
            continue
        for size in sizes:
            loader = [x[i:i + size] for i in range(0, args.n, size)]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    features = tk.features(model, loader, idx, output=output, progress=False)
                except Exception as error:  # noqa: BLE001
                    print(f"{name:32s} B={size:3d} failed: {type(error).__name__}: {str(error)[:200]}")
                    rows.append(dict(model=name, batch=size, error=f"{type(error).__name__}: {error}"))
                    continue
            errors = per_tensor_errors(idx, features, reference)
            k = features.double() @ features.double().T
            k_error = float((k - k_ref).norm() / k_ref.norm())
            bad = {t: e for t, e in errors.items() if e > args.tolerance}
            said = [str(w.message)[:160] for w in caught if issubclass(w.category, RuntimeWarning)]
            rows.append(dict(model=name, batch=size, k_error=k_error, worst=max(errors.values()), bad=bad,
                             warnings=said))
            print(f"{name:32s} B={size:3d} K {k_error:.1e} worst tensor {max(errors.values()):.1e} "
                  f"bad {len(bad)} warnings {len(said)}" + (f"  {sorted(bad)[:4]}" if bad else ""))
            for message in said:
                print(f"{'':37s}warning: {message}")
        print(f"{'':32s} ({time.perf_counter() - start:.0f} s)")
    bad_rows = [r for r in rows if r.get("bad") or "error" in r]
    print(f"{len(bad_rows)} of {len(rows)} runs wrong or failed")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(commit=commit(), torch=torch.__version__, rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
