"""Tuning methods, one module each; importing this package registers them in :data:`TUNERS`."""

from typing import Annotated, Union

from pydantic import Field

from mixtune.train.methods import full, hft, lift, lora, moe_lora  # noqa: F401  (registration)
from mixtune.train.methods.base import TUNERS, Tuner

MethodConfig = Annotated[
    Union[tuple(TUNERS.get(n).params for n in TUNERS)],  # type: ignore[misc]
    Field(discriminator="name"),
]

__all__ = ["TUNERS", "MethodConfig", "Tuner"]
