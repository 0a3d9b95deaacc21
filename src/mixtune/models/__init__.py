"""Models: load a local Hugging Face directory safely; build the built-in tiny Llama. Imports only core."""

from mixtune.models.load import load_model, load_tokenizer, weight_files
from mixtune.models.tiny import CHAT_TEMPLATE, SIZES, TinySize, build_tokenizer, init_tiny

__all__ = [
    "CHAT_TEMPLATE",
    "SIZES",
    "TinySize",
    "build_tokenizer",
    "init_tiny",
    "load_model",
    "load_tokenizer",
    "weight_files",
]
