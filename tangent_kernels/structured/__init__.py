"""The structured Gram: a fully sampled linear layer's contribution to K without features.

For a use y = W a of a whole 2-D parameter, sample b's gradient is sum_t g_bt x_bt^T
(x: the use's input, g: the gradient at its output), so

    K_W[b, b'] = sum_{t, t'} (x_bt . x_b't') (g_bt . g_b't')

costs n^2 T^2 (I + O) from the factors instead of n I O features and an n^2 I O product.

- ``plan.py``: which tensors take it (every use hands factors, whole tensor sampled) and
  the cost model that chooses between it and the features, from measured rates;
- ``contract.py``: the pure tile contraction of stored factors;
- ``stores.py``: the factors' row stores (device/host/disk tiers, checkpoints) for the engine.

The per-batch capture lives with the rules (``persample/factors.py``, ``LinearUse``).
"""

from .plan import STRUCTURED_MODES, Choice, FactorForm, Plan, check_structured, decide

__all__ = ["STRUCTURED_MODES", "Choice", "FactorForm", "Plan", "check_structured", "decide"]
