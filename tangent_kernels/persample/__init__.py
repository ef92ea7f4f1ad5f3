"""Per-sample gradients: the sampled entries of d s(x_b) / d theta for every sample of a batch.

- ``uses.py``: the interception (a TorchFunctionMode over the batched forward) that finds
  every use of a sampled parameter, whatever module or library made the call;
- ``rules.py``: the rules' API and registry (``register``, ``Use``, ``Sink``, pullbacks);
- ``samples.py``: where each data tensor holds its samples (provenance, never sizes);
- one file per rule family: ``linear.py``, ``conv.py``, ``embedding.py``,
  ``broadcast.py`` (parameters in elementwise ops and concatenations), ``decompose.py``
  (norms and multi-head attention rewritten as those primitives), ``fallback.py`` (any
  other batch-separable op, differentiated alone one sample at a time);
- ``views.py``: which sampled entries a view of a parameter holds;
- ``batched.py``: one forward and one backward per batch over all of them;
- ``generic.py``: the torch.func path for what no rule covers;
- ``extractor.py``: both, plus the per-batch check against a sample evaluated alone;
- ``backends.py``: which kernels compute the contractions;
- ``dense.py``: the per-layer dense GEMM strategy on CUDA.
Adding a rule is adding a file that registers it (``rules.register``) and its test.
"""

from .backends import BACKENDS, resolve_backend
from .extractor import FeatureExtractor

__all__ = ["BACKENDS", "FeatureExtractor", "resolve_backend"]
