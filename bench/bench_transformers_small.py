"""tk.gram against a training step on small transformers, and where the batched pass's host time goes.

    python bench/bench_transformers_small.py [--models vit bert gpt2 t5 swin] [--n 256 64]
        [--hidden 64] [--layers 2] [--tokens 16] [--batch 16] [--params 20000] [--repeats 3]
        [--profile] [--device cpu] [--config small|gpu] [--tiny] [--json out.json]

Issue #24's table: torchvision ViT, Hugging Face BERT, GPT-2 and T5 encoder, timm Swin
(windows of 4 tokens, shifted in the second block) at hidden 64, 2 layers, 16 tokens,
batches of 16, p = 20,000 sampled, random weights, fp32. In one run, per model and n: the
training step (one forward + backward of the summed output over the same batches, every
weight gradient computed: the floor of any per-sample method) and tk.gram (with its
per-batch check), a warm-up each, then ``--repeats`` timed calls: median (min-max).

--phases: one more tk.gram call timed by phase (the plan, the per-batch check, the
interception's forward, the backward, the contributions, the rest).

--profile: one more tk.gram call under cProfile, its time split by who spends it (the
interception's Python: uses.py and samples.py with torch's mode dispatch; the rules:
linear.py, broadcast.py, ...; the gather of sampled entries: views.py, sampled.py, the
kernels; tk's bookkeeping: batched.py, the extractor, the engine; the model's own Python;
the autograd engine's backward). The torch ops each one calls count to it (column "ops"),
its own Python apart (column "py").

--config gpu: BERT-base (hidden 768, 12 layers, 128 tokens) and ViT-B/16 (224 x 224, 196
patches) with random weights, batches of 64, n = 2,048 (bench/gpu.sh's transformers-small
stage); --device cuda then also reports, per batch, the host's time apart from the GPU's
(wall time minus the GPU's busy time from torch.profiler, over the first 8 batches of a
call, its fixed work included). --tiny shrinks any config to a
few seconds on a CPU, to test the script itself.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
import warnings
from collections import defaultdict

import torch

import tangent_kernels as tk
from _common import commit
from bench_transformers import batches, training_step  # the same loader split and floor

DEVICE = torch.device("cpu")


def _text(n, length, vocab):
    ids = torch.randint(0, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    for row in range(0, n, 3):  # a third of the rows padded to random lengths
        mask[row, int(torch.randint(length // 2, length, ())):] = 0
    return ids, mask


def _words(c):  # tokens of the text models (the image models: c["tokens"] patches)
    return c.get("text_tokens", c["tokens"])


def bert(n, c):
    import transformers

    config = transformers.BertConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                                     num_attention_heads=c["heads"], intermediate_size=4 * c["hidden"],
                                     max_position_embeddings=max(_words(c), 16), num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = _text(n, _words(c), c["vocab"])
    return (transformers.BertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask},
            lambda out: out.logits[:, 0])


def gpt2(n, c):
    import transformers

    config = transformers.GPT2Config(vocab_size=c["vocab"], n_embd=c["hidden"], n_layer=c["layers"], n_head=c["heads"],
                                     n_positions=max(_words(c), 16), bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids, _ = _text(n, _words(c), c["vocab"])
    return transformers.GPT2LMHeadModel(config), {"input_ids": ids}, lambda out: out.logits[:, -1, 0]


def t5(n, c):
    import transformers

    config = transformers.T5Config(vocab_size=c["vocab"], d_model=c["hidden"], d_kv=c["hidden"] // c["heads"],
                                   d_ff=4 * c["hidden"], num_layers=c["layers"], num_heads=c["heads"],
                                   dropout_rate=0.0)
    ids, mask = _text(n, _words(c), c["vocab"])
    return (transformers.T5EncoderModel(config), {"input_ids": ids, "attention_mask": mask},
            lambda out: out.last_hidden_state[:, 0, 0])


def _side(tokens, patch):  # an image of ``tokens`` patches of patch x patch pixels
    side = int(round(tokens ** 0.5))
    return side * patch


def vit(n, c):
    import torchvision

    size = _side(c["tokens"], c["patch"])
    model = torchvision.models.VisionTransformer(image_size=size, patch_size=c["patch"], num_layers=c["layers"],
                                                 num_heads=c["heads"], hidden_dim=c["hidden"],
                                                 mlp_dim=4 * c["hidden"], num_classes=10)
    return model, torch.randn(n, 3, size, size), lambda out: out[:, 0]


def swin(n, c):
    import timm

    size = _side(c["tokens"], 4)
    window = max(1, int(round(c["tokens"] ** 0.5)) // 2)  # four windows, shifted in every second block
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=size, window_size=window,
                              embed_dim=c["hidden"], depths=(c["layers"],), num_heads=(c["heads"],), num_classes=10)
    return model, torch.randn(n, 3, size, size), lambda out: out[:, 0]


MODELS = {"vit": vit, "bert": bert, "gpt2": gpt2, "t5": t5, "swin": swin}
CONFIGS = {  # --config: sizes, and the models it runs
    "small": dict(hidden=64, layers=2, heads=4, tokens=16, patch=4, vocab=1000, batch=16, params=20_000,
                  n=[256, 64], models=list(MODELS)),
    # BERT-base and ViT-B/16 (ViT-B/16 at 224 x 224: 196 patches of 16 x 16)
    "gpu": dict(hidden=768, layers=12, heads=12, tokens=196, text_tokens=128, patch=16, vocab=30522, batch=64,
                params=500_000, n=[2048], models=["bert", "vit"]),
}
TINY = dict(hidden=32, layers=1, heads=2, tokens=16, text_tokens=16, patch=4, vocab=100, batch=8, params=2000, n=[16])


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


CLOCK = time.perf_counter


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        start = CLOCK()
        fn()
        _sync()
        times.append(CLOCK() - start)
    return times


def span(times):
    return f"{statistics.median(times) * 1e3:8.1f} ms ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"


# Who spends the time, by the file of the Python function (first match wins).
_PARTS = [
    ("interception", ("persample/uses.py", "persample/samples.py", "torch/overrides.py",
                      "torch/utils/_python_dispatch.py")),
    ("rules", ("persample/linear.py", "persample/conv.py", "persample/embedding.py", "persample/broadcast.py",
               "persample/decompose.py", "persample/generic.py", "persample/fallback.py", "persample/rules.py",
               "persample/factors.py")),
    ("gather", ("persample/views.py", "tangent_kernels/sampled.py", "persample/backends.py",
                "tangent_kernels/kernels/", "tangent_kernels/ops.py", "tangent_kernels/_ext.py")),
    ("bookkeeping", ("tangent_kernels/",)),
    ("backward", ("torch/autograd/",)),
]


def _part(filename: str) -> str:
    for part, paths in _PARTS:
        if any(p in filename for p in paths):
            return part
    return "model"  # the model's own Python (transformers, timm, torch.nn), which a training step runs too


def breakdown(profiler: cProfile.Profile) -> dict:
    """{part: [own Python seconds, torch ops' seconds]}: a built-in's time goes to its
    callers' parts in proportion to the time each caller spent in it."""
    stats = pstats.Stats(profiler).stats
    parts = defaultdict(lambda: [0.0, 0.0])
    for (filename, _, _), (_, _, own, _, callers) in stats.items():
        if filename != "~":
            parts[_part(filename)][0] += own
            continue
        total = sum(c[2] for c in callers.values()) or 1.0
        if not callers:
            parts["model"][1] += own
        for (caller_file, _, _), c in callers.items():
            parts[_part(caller_file)][1] += own * c[2] / total
    return {part: parts[part] for part in [p for p, _ in _PARTS] + ["model"]}


def phases(fn) -> dict:
    """{phase: seconds} of one call of ``fn`` (a tk.gram), by timing the batched pass's
    steps in place (wrapping them for this call only): the plan on the first batch, the
    per-batch check (each inclusive of what they run), the interception's forward, the
    backward (autograd), the contributions (the rules and the gather of sampled
    entries), and the rest (the engine, the parameters' swap, the Gram update)."""
    from tangent_kernels.persample import batched, extractor, rules

    seconds, active = defaultdict(float), []
    patched = [(extractor.FeatureExtractor, "plan_for", "plan"), (extractor.FeatureExtractor, "_verify", "check"),
               (batched.BatchedPass, "_forward", "forward"), (torch.autograd, "grad", "backward"),
               (rules.Use, "contribute_all", "contributions")]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patched]

    def timer(original, label):
        def timed_call(*args, **kwargs):
            if any(a in ("plan", "check") for a in active):  # inside those: theirs
                return original(*args, **kwargs)
            active.append(label)
            start = CLOCK()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += CLOCK() - start
                active.pop()
        return timed_call

    for (owner, name, label), (_, _, original) in zip(patched, originals):
        setattr(owner, name, timer(original, label))
    try:
        _sync()
        start = CLOCK()
        fn()
        _sync()
        total = CLOCK() - start
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    parts = {label: seconds[label] for _, _, label in patched}
    parts["rest"] = total - sum(parts.values())
    return parts


def host_per_batch(fn, batches_count: int) -> dict:
    """Per batch: wall time, the GPU's busy time (torch.profiler's kernel time) and the
    rest, the time the GPU waited on the host."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    _sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync()
    wall = time.perf_counter() - start
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 if DEVICE.type == "cuda" else 0.0
    return {"wall_ms": wall / batches_count * 1e3, "device_busy_ms": busy / batches_count * 1e3,
            "host_ms": (wall - busy) / batches_count * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=list(CONFIGS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--n", type=int, nargs="+")
    for size in ("hidden", "layers", "heads", "tokens", "batch", "params"):
        parser.add_argument(f"--{size}", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile's time by part (interception, rules, ...)")
    parser.add_argument("--phases", action="store_true", help="one more call timed by phase (forward, check, ...)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a CPU: to test the script")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: one on a CPU, "
                        "as in the issue's table; torch's own on a GPU machine)")
    parser.add_argument("--max-step-ratio", type=float, default=None, help="fail above this ratio")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: the process's CPU time (one thread, a CPU shared with other jobs: what this "
                             "process spent, not what it waited)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu times the host only: use it with --device cpu")
        CLOCK = time.process_time
    global DEVICE  # noqa: PLW0603 - the script's one device
    DEVICE = torch.device(args.device)
    if args.threads is not None or DEVICE.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    c = dict(CONFIGS[args.config])
    if args.tiny:
        c.update(TINY)
    for size in ("hidden", "layers", "heads", "tokens", "batch", "params", "n", "models"):
        if getattr(args, size) is not None:
            c[size] = getattr(args, size)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = {"device": where, "torch": torch.__version__, "commit": commit(), "config": c, "clock": args.clock,
              "rows": []}
    words = f" ({c['text_tokens']} for text)" if c.get("text_tokens", c["tokens"]) != c["tokens"] else ""
    print(f"{where}, torch {torch.__version__}, commit {report['commit']}; hidden {c['hidden']}, {c['layers']} layers, "
          f"{c['tokens']} tokens{words}, batches of {c['batch']}, p = {c['params']}, fp32, {args.clock} clock")
    failures = []
    for n in c["n"]:
        for name in c["models"]:
            torch.manual_seed(0)
            model, data, output = MODELS[name](n, c)
            model = model.eval().to(DEVICE)
            loader = [b.to(DEVICE) if isinstance(b, torch.Tensor) else {k: v.to(DEVICE) for k, v in b.items()}
                      for b in batches(data, c["batch"])]
            idx = tk.subsample(model, c["params"], seed=0)
            gram = lambda: tk.gram(model, loader, idx, output=output, progress=False)  # noqa: E731
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_step = timed(lambda: training_step(model, loader, output), args.repeats)
                t_tk = timed(gram, args.repeats)
                row = {"model": name, "n": n, "step_s": t_step, "tk_s": t_tk,
                       "ratio": statistics.median(t_tk) / statistics.median(t_step),
                       "generic": tk.coverage(model, loader[0], idx, output=output).generic}
                if args.phases:
                    row["phases_s"] = phases(gram)
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.runcall(gram)
                    row["profile_s"] = breakdown(profiler)
                if DEVICE.type == "cuda" or args.tiny:  # over the first few batches: a GPU trace is long
                    head = loader[:8]
                    row["per_batch"] = host_per_batch(
                        lambda: tk.gram(model, head, idx, output=output, progress=False), len(head))
            report["rows"].append(row)
            print(f"{name:5s} n={n:5d}  step {span(t_step)}  tk.gram {span(t_tk)}  {row['ratio']:.2f}x"
                  + (f"  (generic: {row['generic']})" if row["generic"] else ""))
            if "profile_s" in row:
                total = sum(sum(v) for v in row["profile_s"].values())
                print("        profile (py + ops, ms): " + ", ".join(
                    f"{part} {py * 1e3:.0f}+{ops * 1e3:.0f}" for part, (py, ops) in row["profile_s"].items())
                    + f"; total {total * 1e3:.0f}")
            if "phases_s" in row:
                print("        phases (ms): " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in row["phases_s"].items())
                      + f"; the step {statistics.median(t_step) * 1e3:.0f}")
            if "per_batch" in row:
                b = row["per_batch"]
                print(f"        per batch: wall {b['wall_ms']:.1f} ms, device busy {b['device_busy_ms']:.1f} ms, "
                      f"host (the rest) {b['host_ms']:.1f} ms")
            if args.max_step_ratio is not None and row["ratio"] > args.max_step_ratio:
                failures.append(f"{name} n={n}: {row['ratio']:.2f}x a training step > {args.max_step_ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
