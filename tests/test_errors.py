"""The bad-input catalogue: each case, the exception type it raises and a phrase of its
message that names the problem and the fix, so that every error stays one a user can act on.

CASES: one call each. REFUSALS_THAT_KEEP: the refusals that must also leave the caller's
model and data exactly as they were (checked after the error). The checkpoint refusals
(a folder in use, a changed model or loader, damaged files) need a first run on disk to
refuse, and stay in tests/test_silent_wrong.py; each op's kernel-level errors are in its
own module (tests/test_<op>.py).
"""

import re

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from _models import cnn, cnn_input, mlp
from conftest import batches, seeded_mlp


def gram(model, loader, *args, **kwargs):
    return tk.gram(model, loader, *args, progress=False, **kwargs)


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))


def _loader(n=12, batch=4, seed=1):
    return batches(torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)), batch)


class Returns(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.make = make

    def forward(self, x):
        return self.make(self.lin(x))


class Squeezes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).squeeze(0)


class Detaches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).detach()


def _psd():
    g = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    return g @ g.T


def _indefinite(n=40):
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    K = a + a.T
    assert float(torch.linalg.eigvalsh(K)[0]) < 0  # the case is what it claims to be
    return K


def _non_finite_at_5():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))
    x[5, 1] = float("nan")  # the 6th sample (position 5), in the second batch
    return x


def _two_linear():
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))


def _power_law_30():
    g = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    return g @ g.T


# A CUDA device this machine does not have: none at all here, or an index past the count.
MISSING_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
EMPTY_DATALOADER = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 6)), batch_size=4)


def literal(phrase: str) -> str:
    """A message phrase matched as written (no regex)."""
    return re.escape(phrase)


CASES = {  # name: (call, exception type(s), regex found in the message)
    # --- the loader and its batches
    "empty loader (list)": (lambda: gram(mlp(), []), ValueError, "loader yielded no samples"),
    "empty loader (iterator)": (lambda: gram(mlp(), iter([])), ValueError, "loader yielded no samples"),
    "empty loader (dataloader)": (lambda: gram(mlp(), EMPTY_DATALOADER), ValueError, "loader yielded no samples"),
    "empty loader2": (lambda: gram(mlp(), [torch.randn(2, 6)], None, []), ValueError, "loader2 yielded no samples"),
    "loader not iterable": (lambda: gram(mlp(), 3), TypeError, "loader must be iterable.*got int"),
    "unreadable batch type": (lambda: gram(mlp(), ["not a tensor"]), TypeError, "batch of type str.*inputs=callable"),
    "(X, y) as the loader": (lambda: gram(seeded_mlp(d=4), (X, Y)), ValueError,
                             literal("if you passed (X, y) or [X, y] as the loader")),
    "batches of different dtypes": (lambda: gram(seeded_mlp(d=4), [X[:3], X[3:].double()]), ValueError,
                                    literal("batch 1 of loader differs from its batch 0")),
    "cross kernel of another input shape": (lambda: gram(seeded_mlp(d=4), [X], None, [torch.randn(2, 5)]), ValueError,
                                            literal("loader2 (the second loader of a cross kernel")),
    "loader2 of another image size": (
        lambda: gram(cnn(), [cnn_input(3)], None, [torch.randn(2, 3, 10, 10)]), ValueError,
        r"loader2 \(the second loader of a cross kernel.*arg 0: 3x12x12 float32.*arg 0: 3x10x10 float32"),
    "loader2 of another structure": (lambda: gram(cnn(), [cnn_input(3)], None, [{"input": cnn_input(2)}]),
                                     ValueError, r"loader2 \(the second loader.*input: 3x12x12 float32"),
    "inputs on the meta device": (lambda: gram(seeded_mlp(d=4), [torch.empty(3, 4, device="meta")], device="cpu"),
                                  ValueError, "meta device"),
    "inputs not callable": (lambda: gram(seeded_mlp(d=4), [X], inputs=3), TypeError, literal("inputs must be a callable")),
    "non-finite gradient (loader)": (lambda: gram(_two_linear(), [_non_finite_at_5()[:4], _non_finite_at_5()[4:]]),
                                     ValueError, r"non-finite gradient.*position 5 of loader"),
    "non-finite gradient (loader2)": (
        lambda: gram(_two_linear(), [_non_finite_at_5()[:4]], None, [_non_finite_at_5()[4:]]), ValueError,
        r"position 1 of loader2"),
    # --- the model and its output
    "model not a module": (lambda: gram(lambda x: x, [torch.randn(2, 6)]), TypeError,
                           "model must be a torch.nn.Module"),
    "torchscript model": (lambda: gram(torch.jit.script(seeded_mlp(d=4)), [X]), TypeError, literal("TorchScript module")),
    "meta-device model": (lambda: gram(nn.Linear(4, 3, device="meta"), [X]), ValueError,
                          literal("on the meta device")),
    "batchnorm without running stats": (
        lambda: gram(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)), [X]),
        ValueError, literal("has no running statistics (track_running_stats=False)")),
    "sequence output": (lambda: gram(Returns(lambda h: h.unsqueeze(1).expand(-1, 3, -1)), [torch.randn(3, 6)]),
                        (ValueError, TypeError), r"output has shape \(\d+, 3, 4\).*output=callable"),
    "scalar output": (lambda: gram(Returns(lambda h: h.sum()), [torch.randn(3, 6)]), (ValueError, TypeError),
                      r"output has shape \(\).*\[B, k\] or \[B\]"),
    "tuple output": (lambda: gram(Returns(lambda h: (h, h)), [torch.randn(3, 6)]), (ValueError, TypeError),
                     r"returned a tuple.*'logits'"),
    "dict output without logits": (lambda: gram(Returns(lambda h: {"hidden": h}), [torch.randn(3, 6)]),
                                   (ValueError, TypeError), r"returned a dict.*'logits'"),
    "squeezed output of a batch of one": (lambda: gram(Squeezes(), [X[:1]]), ValueError,
                                          literal("model output has shape (3,) for a batch of 1")),
    "detached output": (lambda: gram(Detaches(), [X]), ValueError,
                        literal("the output does not depend on the parameters")),
    # --- output=
    "output index out of range": (lambda: gram(mlp(k=3), [torch.randn(3, 6)], output=7), ValueError,
                                  r"output=7 is out of range.*k=3.*0 \.\. 2"),
    "output='mean'": (lambda: gram(mlp(), [torch.randn(3, 6)], output="mean"), ValueError,
                      "output.*'first'.*'sum'.*int.*callable"),
    "output=1.5": (lambda: gram(mlp(), [torch.randn(3, 6)], output=1.5), TypeError,
                   "output.*'first'.*'sum'.*int.*callable"),
    "output=True": (lambda: gram(mlp(), [torch.randn(3, 6)], output=True), TypeError,
                    "output.*'first'.*'sum'.*int.*callable"),
    "output callable of the wrong shape": (lambda: gram(mlp(), [torch.randn(3, 6)], output=lambda out: out),
                                           ValueError,
                                           r"callable must return one scalar per sample, a tensor of shape \[B\]"),
    "detached output= callable": (lambda: gram(seeded_mlp(d=4), [X], output=lambda o: o[:, 0].detach()), ValueError,
                                  literal("output= (the model's output depends on them")),
    # --- the other arguments
    "precision='fp8'": (lambda: gram(mlp(), [torch.randn(2, 6)], precision="fp8"), ValueError,
                        r"unknown precision.*available: fp64, fp32, tf32, bf16, fp16"),
    "precision='float32'": (lambda: gram(mlp(), [torch.randn(2, 6)], precision="float32"), ValueError,
                            r"unknown precision.*available: fp64, fp32, tf32, bf16, fp16"),
    "precision='BF16'": (lambda: gram(mlp(), [torch.randn(2, 6)], precision="BF16"), ValueError,
                         r"unknown precision.*available: fp64, fp32, tf32, bf16, fp16"),
    "device='banana'": (lambda: gram(mlp(), [torch.randn(2, 6)], device="banana"), ValueError,
                        "device: 'banana' is not a device; use cpu, cuda or cuda:N"),
    "missing CUDA device (gram)": (lambda: gram(mlp(), [torch.randn(2, 6)], device=MISSING_CUDA), ValueError,
                                   f"device {MISSING_CUDA}: "),
    "missing CUDA device (KernelRidge)": (lambda: tk.KernelRidge(device=MISSING_CUDA), ValueError,
                                          f"device {MISSING_CUDA}: "),
    "max_memory=inf": (lambda: gram(seeded_mlp(d=4), [X], max_memory=float("inf")), ValueError,
                       literal("max_memory must be a positive, finite number")),
    "out requiring grad": (lambda: gram(seeded_mlp(d=4), [X], out=torch.zeros(6, 6, requires_grad=True)), ValueError,
                           literal("out requires grad")),
    "out with internal overlap": (lambda: gram(seeded_mlp(), _loader(), out=torch.empty(200).as_strided((12, 12),
                                                                                                        (1, 1))),
                                  ValueError, r"out's elements overlap in memory"),
    "checkpoint=''": (lambda: gram(seeded_mlp(d=4), [X], checkpoint=""), ValueError, literal("checkpoint='' is not a folder")),
    "checkpoint_key not a str": (lambda: gram(seeded_mlp(d=4), [X], checkpoint_key=3), TypeError,
                                 literal("checkpoint_key must be a str")),
    "cache_dir that is a file": (lambda: gram(seeded_mlp(d=4), [X], store="disk", cache_dir=__file__), ValueError,
                                 literal("is a file; give a folder for the disk store's file")),
    "save_gram meta not a dict": (lambda: tk.save_gram("/tmp/never.safetensors", torch.zeros(2, 2), meta=[1, 2]),
                                  TypeError, literal("meta must be a dict")),
    "negative seed": (lambda: tk.subsample(seeded_mlp(d=4), 5, seed=-1), ValueError, literal("seed must be >= 0")),
    # --- the solvers
    "non-PSD K": (lambda: tk.solve(_psd() - 3 * torch.eye(6), torch.randn(6), 0.1, solver="eigh"), ValueError,
                  literal("K is not positive semi-definite")),
    "beta beyond the dtype": (lambda: tk.solve(_psd(), torch.randn(6), 1e300, solver="eigh"), ValueError,
                              literal("is beyond what float32 arithmetic can solve")),
    **{f"non-PSD K, its smallest eigenvalue ({solver})": (
        lambda solver=solver: tk.solve(_indefinite(), torch.randn(40, dtype=torch.float64), 1e-2, solver=solver),
        ValueError, r"K is not positive semi-definite: its smallest eigenvalue is about -")
       for solver in ["eigh", "cg", "krylov", "auto"]},
    **{f"beta = 1e300 in float32 ({solver})": (
        lambda solver=solver: tk.solve(_power_law_30(), torch.randn(30), 1e300, solver=solver), ValueError,
        r"beta = 1e\+300 is beyond what float32 arithmetic can solve")
       for solver in ["eigh", "cg", "nesterov", "cholesky", "krylov"]},
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_error(name):
    call, error, pattern = CASES[name]
    with pytest.raises(error, match=pattern):
        call()


# --- refusals that must leave the caller's model and data as they were -------------------------

class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


class Renorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.mul_(2)
        return self.lin(x)


class Aliases(nn.Module):
    """Writes its weight through an alias (.data or .detach()) autograd does not see."""

    def __init__(self, alias):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.alias = alias

    def forward(self, x):
        target = self.lin.weight.data if self.alias == "data" else self.lin.weight.detach()
        target.mul_(2)
        return self.lin(x)


def _writes_its_input():
    x = torch.randn(8, 6)
    return lambda: gram(WritesItsInput(), [x[:4], x[4:]]), x


def _writes_a_parameter(model):
    return lambda: gram(model, _loader()), model.lin.weight


REFUSALS_THAT_KEEP = {  # name: (make -> (call, the tensor it must leave as it was), exception, regex)
    "model that writes its input": (_writes_its_input, ValueError,
                                    r"writes its input in place \(TensorBase.mul_ in module '\(the model\)'\)"),
    "forward that writes a parameter": (lambda: _writes_a_parameter(Renorms()), ValueError,
                                        r"writes parameter lin.weight in place"),
    "write through .data of a parameter": (lambda: _writes_a_parameter(Aliases("data")), ValueError,
                                           r"writes parameter lin.weight in place"),
    "write through .detach() of a parameter": (lambda: _writes_a_parameter(Aliases("detach")), ValueError,
                                               r"writes parameter lin.weight in place"),
}


@pytest.mark.parametrize("name", list(REFUSALS_THAT_KEEP))
def test_refusal_keeps_the_callers_model_and_data(name):
    make, error, pattern = REFUSALS_THAT_KEEP[name]
    call, kept = make()
    before = kept.detach().clone()
    with pytest.raises(error, match=pattern):
        call()
    assert torch.equal(kept, before)


# --- the checks' own edges ---------------------------------------------------------------------

def test_finite_gradients_whose_row_sums_overflow_are_accepted():
    """The finiteness check sums rows first; an overflowing sum of finite values must
    not be reported as a non-finite gradient."""
    from tangent_kernels.feature_phase import check_finite

    big = torch.full((3, 8), 3e38)
    check_finite(big, 0, "loader")
    big[2, 5] = -float("inf")
    with pytest.raises(ValueError, match=r"position 12 of loader"):
        check_finite(big, 10, "loader")
