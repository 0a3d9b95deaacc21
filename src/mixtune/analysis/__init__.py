"""Analysis: what fine-tuning changed in the weights (pure functions, one module per method).

- :mod:`mixtune.analysis.intruders`: intruder dimensions (Shuttleworth et al., 2024) and their
  mitigation.
- :mod:`mixtune.analysis.geometry`: task-vector geometry across runs (cosines, TIES sign
  conflicts, top-k mask overlap, norms per layer).
- :mod:`mixtune.analysis.folders`: the two over model folders, one tensor at a time.
"""

from mixtune.analysis.geometry import cosine, layer_norms, sign_conflicts, topk_jaccard
from mixtune.analysis.folders import intruder_table, task_vector_table
from mixtune.analysis.intruders import Intruders, intruder_dimensions, mitigate_intruders

__all__ = ["Intruders", "cosine", "intruder_dimensions", "intruder_table", "layer_norms", "mitigate_intruders",
           "sign_conflicts", "task_vector_table", "topk_jaccard"]
