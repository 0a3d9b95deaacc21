"""Shared plumbing: errors, registries, strict configs, atomic I/O. Imports no stage."""

from mixtune.core.config import Strict, dump_config, existing_path, load_config, parse_overrides, validate
from mixtune.core.errors import CheckpointError, ConfigError, DataError, MixtuneError, UnknownNameError
from mixtune.core.io import atomic_dir, atomic_write_text, follow_umask, output_folder
from mixtune.core.registry import Registry

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MixtuneError",
    "Registry",
    "Strict",
    "UnknownNameError",
    "atomic_dir",
    "atomic_write_text",
    "output_folder",
    "dump_config",
    "existing_path",
    "follow_umask",
    "load_config",
    "parse_overrides",
    "validate",
]
