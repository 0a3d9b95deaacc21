"""Weight-space merging of checkpoints, streamed tensor by tensor from safetensors."""

from mixtune.merge.config import MergeConfig, load_merge_config
from mixtune.merge.methods import MERGE_METHODS
from mixtune.merge import compat  # noqa: F401  (registers mergekit's methods)
from mixtune.merge import compat_spherical, compat_select  # noqa: F401  (and mergekit's newer ones)
from mixtune.merge.run import merge

__all__ = ["MERGE_METHODS", "MergeConfig", "load_merge_config", "merge"]
