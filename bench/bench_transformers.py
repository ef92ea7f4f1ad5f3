"""tk.gram on transformers against a training step, the naive loop, torch.func and Opacus.

    python bench/bench_transformers.py [--n 256] [--params 50000] [--repeats 3] [--json out.json]

Small configs with random weights (hidden 128, 2 layers, 32-64 tokens): a BERT encoder
with padding masks, a GPT-2 decoder and a Llama decoder with tied embeddings, a
torchvision ViT; CPU, fp32, n samples, p sampled parameters. In one run, per model:
- the training step: one batched forward + backward of the summed output over the same
  batches, every weight gradient computed: the floor of any per-sample method;
- tk.gram (the batched pass: taps at the uses of parameters);
- the naive fp32 loop: a backward pass per sample, the full gradient gathered at idx;
- torch.func: vmap(grad) of functional_call per sample (tk's generic path with the
  batched pass switched off; it falls back to a per-sample loop where vmap cannot batch
  the model, and says so);
- Opacus' GradSampleModule: per-sample gradients of every parameter, gathered at idx,
  then G G^T (workarounds: models in eval mode; position_ids passed explicitly to BERT).
It asserts tk.gram <= --max-step-ratio (default 2.5) training steps and >= --min-speedup
(default 1.2) x Opacus and torch.func wherever they run, and records the peak resident
memory of one batch of tk's batched pass against one training step's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch

import tangent_kernels as tk
from _common import commit
from tangent_kernels.tuning import tuned

HIDDEN, LAYERS = 128, 2


def _text(n, length, vocab, padded):
    ids = torch.randint(0, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    if padded:  # a third of the rows padded to random lengths
        for row in range(0, n, 3):
            mask[row, int(torch.randint(length // 2, length, ())):] = 0
    return ids, mask


def bert(n):
    import transformers

    config = transformers.BertConfig(vocab_size=2000, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, intermediate_size=4 * HIDDEN,
                                     max_position_embeddings=128, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    ids, mask = _text(n, 64, 2000, padded=True)
    positions = torch.arange(64).expand(n, 64)  # for Opacus, which needs them explicitly
    return (transformers.BertForSequenceClassification(config),
            {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, lambda out: out.logits[:, 0])


def gpt2(n):
    import transformers

    config = transformers.GPT2Config(vocab_size=2000, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids, _ = _text(n, 32, 2000, padded=False)
    return transformers.GPT2LMHeadModel(config), {"input_ids": ids}, lambda out: out.logits[:, -1, 0]


def llama(n):
    import transformers

    config = transformers.LlamaConfig(vocab_size=2000, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=64)
    ids, mask = _text(n, 32, 2000, padded=False)
    return transformers.LlamaForCausalLM(config), {"input_ids": ids, "attention_mask": mask}, lambda out: out.logits[:, -1, 0]


def vit(n):
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=LAYERS, num_heads=4,
                                                 hidden_dim=HIDDEN, mlp_dim=4 * HIDDEN, num_classes=10)
    return model, torch.randn(n, 3, 32, 32), lambda out: out[:, 0]


MODELS = {"bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit}


def batches(data, size):
    n = data.shape[0] if isinstance(data, torch.Tensor) else next(iter(data.values())).shape[0]
    if isinstance(data, torch.Tensor):
        return [data[i:i + size] for i in range(0, n, size)]
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def training_step(model, loader, output):
    for batch in loader:
        output(call(model, batch)).sum().backward()
    model.zero_grad(set_to_none=True)


def naive(model, loader, output, positions):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for batch in loader:
        for one in batches(batch, 1):
            grads = torch.autograd.grad(output(call(model, one))[0], params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
            rows.append(flat[positions])
    g = torch.stack(rows)
    return g @ g.T


def opacus_gram(model, loader, output, positions):
    from opacus import GradSampleModule

    # Opacus records activations only in training mode: dropout is off in every config
    # here, so train() computes what eval() does.
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    rows = []
    try:
        for batch in loader:
            output(call(wrapped, batch)).sum().backward()
            flat = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], dim=1)
            rows.append(flat[:, positions])
            wrapped.zero_grad(set_to_none=True)
            for p in params:
                p.grad_sample = None
    finally:  # its hooks live on the user's modules
        wrapped._close()
        model.eval()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
    g = torch.cat(rows)
    return g @ g.T


def func_gram(model, loader, idx, output):
    with tuned(batched=False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k = tk.gram(model, loader, idx, output=output, progress=False)
    fell_back = any("per-sample autograd loop" in str(w.message) for w in caught)
    return k, fell_back


DEVICE = torch.device("cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, repeats):
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return times, result


def to_device(data):
    if isinstance(data, dict):
        return {k: v.to(DEVICE) for k, v in data.items()}
    return data.to(DEVICE)


def cuda_peak_mb(fn) -> float:
    torch.cuda.synchronize(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    fn()
    torch.cuda.synchronize(DEVICE)
    return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def memory_probe(name: str, what: str, batch: int, params: int) -> None:
    """In a fresh process: build the model and one batch, run ``what`` once, print the peak RSS."""
    torch.manual_seed(0)
    model, data, output = MODELS[name](batch)
    model.eval()
    idx = tk.subsample(model, params, seed=0)
    if what == "step":
        training_step(model, [data], output)
    elif what == "tk":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tk.features(model, [data], idx, output=output, progress=False)
    print(_peak_rss_mb())


def peak_memory_mb(name: str, batch: int, params: int):
    """Peak resident memory of one batch's training step and of tk's batched pass, above a
    process that only built the model and the batch (each in a fresh process: an
    allocator keeps freed memory resident, so in-process peaks would not move)."""
    import subprocess
    import sys

    def probe(what):
        out = subprocess.run([sys.executable, __file__, "--memory-probe", name, what, "--batch", str(batch),
                              "--params", str(params)], capture_output=True, text=True, check=True).stdout
        return float(out.strip().splitlines()[-1])

    base = probe("none")
    return probe("step") - base, probe("tk") - base


def span(times):
    return f"{statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--params", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats of the naive loop and torch.func")
    parser.add_argument("--max-step-ratio", type=float, default=2.5)
    parser.add_argument("--min-speedup", type=float, default=1.2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: torch.cuda's allocator there)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(*args.memory_probe, args.batch, args.params)
        return 0
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    report = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "commit": commit(), "n": args.n, "p": args.params, "models": {}}
    failures = []
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report["device"] = where
    print(f"{where}, torch {torch.__version__}, commit {report['commit']}, "
          f"n = {args.n}, p = {args.params}, batches of {args.batch}, fp32")
    for name in args.models:
        model, data, output = MODELS[name](args.n)
        model = model.eval().to(DEVICE)
        loader = [to_device(b) for b in batches(data, args.batch)]
        idx = tk.subsample(model, args.params, seed=0)
        positions = idx.positions.to(DEVICE)
        result = {}
        t_step, _ = timed(lambda: training_step(model, loader, output), args.repeats)
        t_tk, k = timed(lambda: tk.gram(model, loader, idx, output=output, progress=False), args.repeats)
        report_cov = tk.coverage(model, loader[0], idx, output=output)
        t_naive, k_naive = timed(lambda: naive(model, loader, output, positions), args.slow_repeats)
        error = float((k.double() - k_naive.double()).norm() / k_naive.double().norm())
        t_func, (k_func, fell_back) = timed(lambda: func_gram(model, loader, idx, output), args.slow_repeats)
        try:
            t_opacus, k_opacus = timed(lambda: opacus_gram(model, loader, output, positions), args.repeats)
            opacus_error = float((k_opacus.double() - k_naive.double()).norm() / k_naive.double().norm())
        except Exception as failure:  # noqa: BLE001 - a baseline that cannot run this model is reported
            t_opacus, opacus_error = None, f"{type(failure).__name__}: {str(failure).splitlines()[0][:120]}"
        if DEVICE.type == "cuda":
            mem_step = cuda_peak_mb(lambda: training_step(model, loader[:1], output))
            mem_tk = cuda_peak_mb(lambda: tk.features(model, loader[:1], idx, output=output, progress=False))
        else:
            mem_step, mem_tk = peak_memory_mb(name, args.batch, args.params)
        med = statistics.median
        step_ratio = med(t_tk) / med(t_step)
        result = {"train_step_s": t_step, "tk_s": t_tk, "naive_s": t_naive, "func_s": t_func,
                  "func_fell_back_to_loop": fell_back, "opacus_s": t_opacus, "opacus_error": opacus_error,
                  "tk_error_vs_naive": error, "tk_over_step": step_ratio, "generic": report_cov.generic,
                  "peak_mb_step": mem_step, "peak_mb_tk_features": mem_tk}
        report["models"][name] = result
        print(f"\n{name}: every tensor batched: {report_cov.generic == []}; K vs naive loop {error:.1e}")
        print(f"  training step          {span(t_step)}")
        print(f"  tk.gram                {span(t_tk)}   {step_ratio:.2f}x the step")
        print(f"  naive loop             {span(t_naive)}   tk {med(t_naive) / med(t_tk):.1f}x faster")
        print(f"  torch.func{' (loop)' if fell_back else '       '}      {span(t_func)}   tk {med(t_func) / med(t_tk):.1f}x faster")
        if t_opacus is not None:
            print(f"  Opacus                 {span(t_opacus)}   tk {med(t_opacus) / med(t_tk):.1f}x faster "
                  f"(K vs naive {opacus_error:.1e})")
        else:
            print(f"  Opacus                 failed: {opacus_error}")
        print(f"  peak memory of one batch above the model: training step {mem_step:.0f} MB, tk's batched pass "
              f"{mem_tk:.0f} MB ({mem_tk / max(mem_step, 1e-9):.2f}x)")
        if step_ratio > args.max_step_ratio:
            failures.append(f"{name}: tk.gram {step_ratio:.2f}x a training step > {args.max_step_ratio}")
        for base, times in (("torch.func", t_func), ("Opacus", t_opacus)):
            if times is not None and med(times) / med(t_tk) < args.min_speedup:
                failures.append(f"{name}: tk.gram only {med(times) / med(t_tk):.2f}x faster than {base}")
        if error > 1e-3:
            failures.append(f"{name}: K differs from the naive loop by {error:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
