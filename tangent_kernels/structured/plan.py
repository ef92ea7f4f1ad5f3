"""Which sampled tensors take the structured Gram, and the cost model that decides it.

A tensor is *eligible* when every entry of it is sampled and every use of it in the
forward hands its per-sample gradient as factors (``Use.factor_form``: a whole 2-D
weight of a linear map, possibly transposed, possibly used several times with the input
on the same axis; the whole weight of an ungrouped 1-D/2-D convolution, as a linear map
of its unfolded input with the output positions as tokens). Its uses' tokens are then
concatenated: T = sum of the uses' tokens.

Cost per pair of rows of K (k outputs per sample share the inputs' Gram):
- features: X G multiply-adds in the Gram GEMM (forming the features, T X G per row, is
  left out: it is amortized over the n rows it meets);
- structured: T^2 (G + X / k^2) multiply-adds in the two factor GEMMs, plus T^2
  elementwise multiply-adds for the product of the two Grams and the sum over (t, t').
The two kinds of work run at different rates (a GEMM near peak, the elementwise product
at memory speed), measured once per process on the device and dtype at hand. "auto"
takes the structured form only when it is estimated _MARGIN times cheaper and saves at
least _MIN_SAVED multiply-adds per pair of *samples* (k^2 pairs of rows for k outputs):
each structured tensor costs a few stores and small GEMMs per tile in Python overhead,
which a tiny layer never pays back, and a margin keeps a noisy rate measurement from
flipping borderline choices between runs. (A floor on the tensor's entries instead kept a
10-logit head of 2,560 entries on features for output="full", where its features cost
k^2 = 100 times more per pair of samples: 35% of an MLP's full kernel.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["STRUCTURED_MODES", "Choice", "FactorForm", "Plan", "check_structured", "decide", "measured_rates"]

STRUCTURED_MODES = ("auto", "never", "always")
_MARGIN = 2.0
_MIN_SAVED = 1024


def check_structured(mode) -> str:
    if mode not in STRUCTURED_MODES:
        raise ValueError(f"structured must be one of {', '.join(map(repr, STRUCTURED_MODES))} ('auto': the cheaper of "
                         f"features and the structured Gram per tensor; 'never': features only; 'always': the "
                         f"structured Gram wherever it is exact); got {mode!r}")
    return mode


@dataclass(frozen=True)
class FactorForm:
    """One use's per-sample gradient of a whole 2-D tensor: sum_t x_t (x) g_t, with the
    input factor x [B, tokens, x_dim] on leaf axis ``axis`` and the output gradient
    g [B, tokens, g_dim] on the other."""

    axis: int
    x_dim: int
    g_dim: int
    tokens: int
    # x holds token ids (x_dim 1) into the leaf's rows, which stand for one-hot rows: the
    # inputs' Gram is token equality (an embedding table, F.embedding).
    index: bool = False


@dataclass(frozen=True)
class Choice:
    """The decision for one eligible tensor; costs are seconds per pair of rows of K.

    x_dim, g_dim: the factors' widths as stored; for a Kronecker-sampled tensor (a set
    of rows times a set of columns of its matrix [shape[0], rest]) the selected ones,
    with x_index / g_index the selected entries of the uses' x and g (None: all), and
    use_dims the uses' own (x, g) widths.
    """

    name: str
    axis: int
    x_dim: int
    g_dim: int
    tokens: int  # summed over its uses
    uses: int
    features_cost: float
    structured_cost: float
    structured: bool
    use_dims: Tuple[int, int] = (0, 0)
    x_index: Optional[torch.Tensor] = None
    g_index: Optional[torch.Tensor] = None
    # A bias absorbed into this weight's factors: x gets a constant 1 appended (x_dim
    # counts it), so x.x' + 1 makes the bias' Gram (sum_t g_t).(sum_t' g'_t') part of the
    # weight's, with no features of its own.
    bias: Optional[str] = None
    index: bool = False  # x are token ids (FactorForm.index)

    def describe(self) -> str:
        ratio = self.features_cost / self.structured_cost  # > 1: the structured form is cheaper
        width = f"{self.x_dim - 1}+1 (its bias {self.bias})" if self.bias else f"{self.x_dim}"
        if self.index:
            width = "token ids"
        shape = f"T={self.tokens}, in={width}, out={self.g_dim}" + (f", {self.uses} uses" if self.uses > 1 else "")
        if self.x_index is not None or self.g_index is not None:
            shape += f", Kronecker-sampled of {self.use_dims[0]}x{self.use_dims[1]}"
        estimate = f"{ratio:.3g}x cheaper" if ratio >= 1 else f"{1 / ratio:.3g}x costlier"
        if self.structured:
            return f"Gram: structured ({shape}; est. {estimate} than features)"
        return f"Gram: features ({shape}; structured est. {estimate})"


@dataclass
class Plan:
    """choices: eligible tensors (structured or not); ineligible: tensor -> why not."""

    choices: Dict[str, Choice] = field(default_factory=dict)
    ineligible: Dict[str, str] = field(default_factory=dict)

    @property
    def structured(self) -> List[str]:
        return [name for name, c in self.choices.items() if c.structured]

    @property
    def absorbed(self) -> Dict[str, str]:
        """bias -> the structured weight whose factors carry it."""
        return {c.bias: name for name, c in self.choices.items() if c.structured and c.bias}

    @property
    def without_features(self) -> List[str]:
        """Every tensor whose Gram comes from factors: the structured ones and their biases."""
        return self.structured + list(self.absorbed)

    def drop(self, names, why: str) -> None:
        for name in names:
            for weight in [w for w, c in self.choices.items() if c.bias == name]:
                self.choices[weight] = replace(self.choices[weight], bias=None, x_dim=self.choices[weight].x_dim - 1)
            if name in self.choices:
                bias = self.choices.pop(name).bias
                self.ineligible[name] = why
                if bias:
                    self.ineligible[bias] = f"{why} (absorbed into {name})"

    def describe(self, name: str) -> Optional[str]:
        if name in self.choices:
            return self.choices[name].describe()
        if name in self.absorbed:
            return f"Gram: structured with {self.absorbed[name]} (its input augmented by a constant 1)"
        return f"Gram: features ({self.ineligible[name]})" if name in self.ineligible else None


_RATES: Dict[Tuple[str, torch.dtype], Tuple[float, float]] = {}


def _best_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up: first-call allocation and thread start-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measured_rates(device: torch.device, dtype: torch.dtype) -> Tuple[float, float]:
    """(GEMM multiply-adds per second, elementwise multiply-adds per second) on
    ``device`` in ``dtype``, measured once per process at shapes like a Gram tile's
    (a few milliseconds on a CPU)."""
    key = (str(device), dtype)
    if key not in _RATES:
        m, d = 512, 512
        # The library's own generator: measuring a rate must not move the caller's random stream.
        generator = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(m, d, device=device, dtype=dtype, generator=generator) for _ in range(2))
        gemm = m * m * d / _best_seconds(lambda: a @ b.T, device)
        x, y = (torch.randn(m, m * 4, device=device, dtype=dtype, generator=generator) for _ in range(2))
        # The product of two Gram blocks summed over token pairs: read both, multiply, reduce.
        elementwise = x.numel() / _best_seconds(lambda: (x * y).view(m, m, 4).sum(-1), device)
        _RATES[key] = (gemm, elementwise)
    return _RATES[key]


def _costs(x_dim: int, g_dim: int, tokens: int, outputs: int, rates, index_rows: int = 0) -> Tuple[float, float]:
    """index_rows: the table's rows for token-id factors (their features span every row;
    their inputs' Gram is an equality test, priced as elementwise work)."""
    gemm, elementwise = rates
    pairs = tokens * tokens
    if index_rows:
        return index_rows * g_dim / gemm, pairs * g_dim / gemm + 2 * pairs / elementwise
    features = x_dim * g_dim / gemm
    structured = pairs * (g_dim + x_dim / outputs ** 2) / gemm + pairs / elementwise
    return features, structured


def _product_selection(st):
    """(rows, cols) of the leaf's matrix [shape[0], rest] that the sampled entries are
    all pairs of (None, None: the whole tensor), or False when they are not such a set."""
    numel = st.leaf.numel()
    if st.m == numel:
        return None, None
    cols = numel // st.leaf.shape[0]
    local = st._sorted_local
    rows_of, cols_of = torch.unique(local // cols), torch.unique(local % cols)
    # Distinct entries, all in rows_of x cols_of, as many as its pairs: exactly that set.
    if rows_of.numel() * cols_of.numel() != st.m:
        return False
    return rows_of, cols_of


def _absorbable_bias(st, touching: Sequence, uses: Sequence, sampled: Sequence, excluded: Dict[str, str]):
    """The bias that every use of the weight ``st`` adds, and nothing else uses, whole
    (``Use.absorbable_bias``): its name, or None."""
    names = {use.absorbable_bias(st) for use in touching}
    if len(names) != 1 or None in names:
        return None
    name = names.pop()
    bias = next((other for other in sampled if other.name == name), None)
    if bias is None or name in excluded or bias.m != bias.leaf.numel():
        return None
    if any(any(other is bias for other in use.sampled) for use in uses if use not in touching):
        return None
    return name


def decide(uses: Sequence, sampled: Sequence, excluded: Dict[str, str], outputs: int, mode: str,
           device: torch.device, dtype: torch.dtype, forced: Optional[Sequence[str]] = None) -> Plan:
    """The plan for the sampled tensors (``views.SampledTensor``) of one forward's ``uses``.

    excluded: tensors already on another path (generic), with why. forced: exactly these
    tensors structured (a checkpointed run's plan), each still checked for eligibility.
    mode "products" (internal, the Kronecker projection's: sketch.py) takes every eligible
    tensor whose factors are an input and an output gradient, by structure alone (no
    measured cost may change which tensors a seed's R projects how); lookups of token ids
    are left to the features.
    """
    plan = Plan()
    if mode == "never" and forced is None:
        return plan
    rates = measured_rates(device, dtype)
    for st in sampled:
        if st.name in excluded:
            plan.ineligible[st.name] = excluded[st.name]
            continue
        if st.leaf.dim() < 2:
            # A bias or norm scale: its features (n O) cost what a structured form would.
            plan.ineligible[st.name] = f"{st.leaf.dim()}-D (its features are as cheap)"
            continue
        selection = _product_selection(st)
        if selection is False:
            # A subset of entries that is not rows x columns breaks the outer-product form:
            # its Gram is not a product of two small Grams (exact only as features).
            plan.ineligible[st.name] = "partially sampled, not rows x columns (a Kronecker subsample)"
            continue
        touching = [use for use in uses if any(other is st for other in use.sampled)]
        forms = [use.factor_form(st) for use in touching]
        if not touching:
            plan.ineligible[st.name] = "no use reaches it"
            continue
        if any(form is None for form in forms):
            labels = sorted({use.label for use, form in zip(touching, forms) if form is None})
            plan.ineligible[st.name] = f"a use without factors ({', '.join(labels)})"
            continue
        if len({(f.axis, f.x_dim, f.g_dim, f.index) for f in forms}) != 1:
            plan.ineligible[st.name] = "uses with the input on different axes (or lookups and products)"
            continue
        first = forms[0]
        if first.index and mode == "products":
            plan.ineligible[st.name] = "an embedding lookup (token ids, no input factor to project)"
            continue
        if first.index and selection != (None, None):
            plan.ineligible[st.name] = "partially sampled embedding table (the token-id form needs it whole)"
            continue
        tokens = sum(f.tokens for f in forms)
        rows, cols = selection
        # The leaf's matrix is [rows, cols]; x lies along axis ``first.axis`` of it.
        x_index, g_index = (cols, rows) if first.axis == 1 else (rows, cols)
        x_dim = first.x_dim if x_index is None else x_index.numel()
        g_dim = first.g_dim if g_index is None else g_index.numel()
        features, structured = _costs(x_dim, g_dim, tokens, outputs, rates,
                                      st.leaf.shape[0] if first.index else 0)
        saved = (features - structured) * rates[0] * outputs ** 2  # multiply-adds per pair of samples
        worth = structured * _MARGIN < features and saved >= _MIN_SAVED
        take = st.name in forced if forced is not None else (mode in ("always", "products") or worth)
        # The Kronecker projection leaves biases to the dense kind: folded in, each factor
        # x would be copied to append its constant 1, for a tensor of O entries.
        fold = take and selection == (None, None) and mode != "products"
        bias = _absorbable_bias(st, touching, uses, sampled, excluded) if fold else None
        if bias is not None and forced is not None and bias not in forced:
            bias = None  # a checkpointed run that kept the bias on features (made before absorption)
        plan.choices[st.name] = Choice(st.name, first.axis, x_dim + (bias is not None), g_dim, tokens, len(forms),
                                       features, structured, take, (first.x_dim, first.g_dim), x_index, g_index, bias,
                                       first.index)
    for bias in plan.absorbed:
        plan.ineligible.pop(bias, None)
    if forced is not None:
        missing = [name for name in forced if name not in plan.choices and name not in plan.absorbed]
        if missing:
            why = "; ".join(f"{name}: {plan.ineligible.get(name, 'not sampled')}" for name in missing)
            raise ValueError(f"the checkpointed run took the structured Gram for {', '.join(missing)}, which this "
                             f"model cannot ({why}): delete the checkpoint folder to start over")
    return plan
