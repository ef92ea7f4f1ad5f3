"""Look-ahead active learning: what the network would predict if it also trained on a
candidate point, for thousands of candidates and labels at once (``LookAhead``), and
acquisition scores over it (``acquire``), and whole rounds from a model and data
(``run_rounds``). See docs/lookahead.md."""

from .acquire import (entropy, expected_change, margin, most_likely_change, output_change, pseudo_label_disagreement,
                      random_scores, select)
from .loop import STRATEGIES, Candidates, History, run_rounds
from .model import LookAhead

__all__ = ["STRATEGIES", "Candidates", "History", "LookAhead", "entropy", "expected_change", "margin",
           "most_likely_change", "output_change", "pseudo_label_disagreement", "random_scores", "run_rounds", "select"]
