"""Analysis: what fine-tuning changed in the weights (pure functions, one module per method).

- :mod:`mixtune.analysis.intruders`: intruder dimensions (Shuttleworth et al., 2024) and their
  mitigation.
- :mod:`mixtune.analysis.geometry`: task-vector geometry across runs (cosines, TIES sign
  conflicts, top-k mask overlap, norms per layer).
"""

from mixtune.analysis.geometry import cosine, layer_norms, sign_conflicts, topk_jaccard
from mixtune.analysis.intruders import Intruders, intruder_dimensions, mitigate_intruders

__all__ = ["Intruders", "cosine", "intruder_dimensions", "layer_norms", "mitigate_intruders", "sign_conflicts",
           "topk_jaccard"]
