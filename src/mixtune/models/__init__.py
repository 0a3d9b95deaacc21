"""Models: load a local Hugging Face directory safely; build the built-in tiny Llama. Imports only core."""

from mixtune.models.load import LoadConfig, load_model, load_tokenizer, weight_files
from mixtune.models.tiny import CHAT_TEMPLATE, SIZES, TinySize, build_tokenizer, init_tiny

__all__ = [
    "CHAT_TEMPLATE",
    "LoadConfig",
    "SIZES",
    "TinySize",
    "build_tokenizer",
    "init_tiny",
    "load_model",
    "load_tokenizer",
    "weight_files",
]
