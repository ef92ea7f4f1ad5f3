"""Look-ahead active learning: what the network would predict if it also trained on a
candidate point, for thousands of candidates and labels at once (``LookAhead``), and
acquisition scores over it (``acquire``). See docs/lookahead.md."""

from .acquire import (entropy, expected_change, margin, most_likely_change, output_change, random_scores,
                      select)
from .model import LookAhead

__all__ = ["LookAhead", "entropy", "expected_change", "margin", "most_likely_change", "output_change",
           "random_scores", "select"]
