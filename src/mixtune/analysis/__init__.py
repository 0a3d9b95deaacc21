"""Analysis: what fine-tuning changed in the weights (pure functions, one module per method).

- :mod:`mixtune.analysis.intruders`: intruder dimensions (Shuttleworth et al., 2024) and their
  mitigation.
- :mod:`mixtune.analysis.geometry`: task-vector geometry across runs (cosines, TIES sign
  conflicts, top-k mask overlap, norms per layer).
- :mod:`mixtune.analysis.folders`: the two over model folders, one tensor at a time.
- :mod:`mixtune.analysis.tuco`: TuCo, the tuning contribution of fine-tuning to a forward pass, per
  prompt (Nuti et al., 2025).
- :mod:`mixtune.analysis.conjugate`: conjugate prompting (Kotha et al., 2024), abilities scored under
  reworded prompts, to tell a suppressed ability from an erased one.
- :mod:`mixtune.analysis.localize`: skill localization by grafting (Panigrahi et al., 2023): the
  basepatch, grafts, the learned region, mask overlap.
"""

from mixtune.analysis.conjugate import TRANSFORMS, applies, conjugate_scores, get_transform
from mixtune.analysis.geometry import cosine, layer_norms, sign_conflicts, topk_jaccard
from mixtune.analysis.folders import intruder_table, task_vector_table
from mixtune.analysis.intruders import Intruders, intruder_dimensions, mitigate_intruders
from mixtune.analysis.localize import (basepatch, graft, load_masks, localize, localize_on_records, mask_overlap,
                                       record_batches, save_masks, sparsity_curve)
from mixtune.analysis.tuco import block_components, tuco_from_components, tuning_contribution

__all__ = ["Intruders", "TRANSFORMS", "applies", "basepatch", "block_components", "conjugate_scores", "cosine",
           "get_transform", "graft", "intruder_dimensions", "intruder_table", "layer_norms", "load_masks", "localize",
           "localize_on_records", "mask_overlap", "mitigate_intruders", "record_batches", "save_masks",
           "sign_conflicts", "sparsity_curve", "task_vector_table", "topk_jaccard", "tuco_from_components",
           "tuning_contribution"]
