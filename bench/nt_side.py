"""The neural-tangents side of bench/bench_neural_tangents.py: empirical NTKs of stax
models that mirror the torch ones, on the torch weights exported to an .npz.

This script runs in a separate virtual environment, outside the project's: neural-tangents
0.6.5 needs an old JAX that cannot share an environment with the project's dependencies.
It imports only numpy, jax and neural_tangents (never torch nor tangent_kernels). The
environment:

    python3 -m venv ntv && ntv/bin/pip install "jax[cpu]==0.4.25" jaxlib==0.4.25 "numpy<2" \\
        "scipy<1.13" tf2jax==0.3.6 flax==0.8.2 "ml_dtypes<0.5" neural-tangents==0.6.5

bench/bench_neural_tangents.py starts it once per (model, n, output) as

    ntv/bin/python bench/nt_side.py --weights W.npz --model cnn --n 256 --output full \\
        --impls structured,jacobian --repeats 3 --out DIR [--fp64]

W.npz holds the torch state_dict (torch layouts: Linear weight [out, in], Conv2d weight
OIHW) under "param/<name>" and the inputs (NCHW for images) under "x/<model>". The layouts
are converted here: stax's Dense weight is [in, out]; its convolutions are NHWC / HWIO; its
Flatten flattens NHWC in (h, w, c) order where torch's flattens NCHW in (c, h, w), so the
dense head's weight is permuted to match. Torch's Conv2d(padding=1, stride=2) pads one on
each side, which stax's "SAME" does not (it pads (0, 1) there): an explicit padding layer
and a "VALID" convolution stand in for it.

For each implementation asked (structured: NtkImplementation.STRUCTURED_DERIVATIVES,
jacobian: NtkImplementation.JACOBIAN_CONTRACTION), K(x, x) by nt.empirical_ntk_fn(...,
trace_axes=(), vmap_axes=0) under jax.jit, x2=None: for output "full" the function is the
whole [n, 10] logits and K is [n, n, 10, 10]; for "one" it is logit 0 alone ([n, 1]) and
K is [n, n]. A warm-up call (the jit compilation; its seconds are reported apart) then the
timed repeats, round-robin over the implementations, each ended by block_until_ready.
Written to --out: K_<impl>.npy and result.json (times, compile seconds, peak RSS, versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np


def _pad_layer(pad):
    """A stax layer padding the spatial axes of NHWC inputs by ``pad`` on each side
    (torch's Conv2d padding); only init_fn and apply_fn are used (empirical kernels)."""
    import jax.numpy as jnp

    def init_fn(rng, input_shape):
        n, h, w, c = input_shape
        return (n, h + 2 * pad, w + 2 * pad, c), ()

    def apply_fn(params, inputs, **kwargs):
        return jnp.pad(inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def kernel_fn(k, **kwargs):
        raise NotImplementedError("padding layer: empirical kernels only")

    return init_fn, apply_fn, kernel_fn


def models():
    """{name: (stax layers, input shape in NT layout, {torch prefix: layer index, kind})}."""
    from neural_tangents import stax

    def dense(width):
        return stax.Dense(width, b_std=1.0, parameterization="standard")

    def conv(channels, strides, padding):
        return stax.Conv(channels, (3, 3), strides=strides, padding=padding, b_std=1.0, parameterization="standard")

    return {
        # bench_structured.mlp: Linear 784-512-512-10 (Sequential indices 0, 2, 4).
        "mlp": ([dense(512), stax.Relu(), dense(512), stax.Relu(), dense(10)], (784,),
                {"0": (0, "linear"), "2": (2, "linear"), "4": (4, "linear")}),
        # The MLP 64-256-256-10.
        "mlp_small": ([dense(256), stax.Relu(), dense(256), stax.Relu(), dense(10)], (64,),
                      {"0": (0, "linear"), "2": (2, "linear"), "4": (4, "linear")}),
        # bench_structured.cnn: Conv2d(3, 16, 3, padding=1), ReLU, Conv2d(16, 32, 3, stride=2,
        # padding=1), ReLU, Flatten, Linear(2048, 10), on 3x16x16. The first convolution's
        # padding is stax's SAME (one each side for a 3x3 filter at stride 1); the second's
        # is the padding layer and VALID.
        "cnn": ([conv(16, (1, 1), "SAME"), stax.Relu(), _pad_layer(1), conv(32, (2, 2), "VALID"), stax.Relu(),
                 stax.Flatten(), dense(10)], (16, 16, 3),
                {"0": (0, "conv"), "2": (3, "conv"), "5": (6, ("linear_after_nhwc_flatten", 32, 8, 8))}),
    }


def convert(params_template, weights, mapping, dtype):
    """The torch weights in the stax parameter tree (shapes checked against init_fn's)."""
    import jax.numpy as jnp

    params = list(params_template)
    for prefix, (layer, kind) in mapping.items():
        W, b = weights[f"param/{prefix}.weight"], weights[f"param/{prefix}.bias"]
        if kind == "linear":
            W = W.T  # [out, in] -> [in, out]
        elif kind == "conv":
            W = W.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind[0] == "linear_after_nhwc_flatten":
            # torch's input index is c * H * W + h * W + w, stax's h * W * C + w * C + c.
            _, channels, height, width = kind
            out_features, in_features = W.shape
            W = W.reshape(out_features, channels, height, width).transpose(2, 3, 1, 0).reshape(in_features, out_features)
        else:
            raise ValueError(kind)
        W_template, b_template = params_template[layer]
        if W.shape != W_template.shape or b.size != b_template.size:
            raise ValueError(f"layer {layer}: {W.shape} / {b.shape} against stax's {W_template.shape} / "
                             f"{b_template.shape}")
        params[layer] = (jnp.asarray(W, dtype), jnp.asarray(b.reshape(b_template.shape), dtype))
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--output", choices=("one", "full"), required=True)
    parser.add_argument("--impls", default="structured,jacobian")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp64", action="store_true", help="jax_enable_x64 and float64 weights and inputs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import jax

    if args.fp64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    dtype = jnp.float64 if args.fp64 else jnp.float32
    layers, shape, mapping = models()[args.model]
    init_fn, apply_fn, _ = stax.serial(*layers)
    weights = np.load(args.weights)
    x = weights[f"x/{args.model}"][:args.n]
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    x = jnp.asarray(x, dtype)
    _, template = init_fn(jax.random.PRNGKey(0), (1,) + shape)
    params = convert(template, weights, mapping, dtype)

    if args.output == "full":
        f = apply_fn
    else:
        def f(params, x):
            return apply_fn(params, x)[:, :1]

    implementations = {"structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
                       "jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION}
    fns, compile_s, times, kernels = {}, {}, {}, {}
    for name in args.impls.split(","):
        fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=implementations[name]))
        start = time.perf_counter()
        K = fn(x, None, params)
        K.block_until_ready()
        compile_s[name] = time.perf_counter() - start  # compilation and one run
        fns[name], times[name] = fn, []
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            K = fn(x, None, params)
            K.block_until_ready()
            times[name].append(time.perf_counter() - start)
            kernels[name] = K
    for name, K in kernels.items():
        K = np.asarray(K)
        if args.output == "one":
            K = K[:, :, 0, 0]
        np.save(os.path.join(args.out, f"K_{name}.npy"), K)
    result = {"times": times, "compile_and_first_s": compile_s,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
              "jax": jax.__version__, "neural_tangents": nt.__version__, "numpy": np.__version__,
              "python": platform.python_version(), "jax_devices": [str(d) for d in jax.devices()],
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    with open(os.path.join(args.out, "result.json"), "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
