"""The data stage: sources, built-in abilities, formatting and packing, mixtures."""
