"""The precision strings (Lightning Fabric's) and what each means, validated in one place.

Parsing a precision needs no kernels, so the CLI can check `--precision` before anything is
built. mixprec.Precision turns a parsed mode into a training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ENV_VAR = "MIXPREC_PRECISION"


@dataclass(frozen=True)
class Mode:
    """What a precision string means: the dtype, whether it is autocast ("mixed") or the weights'
    own dtype ("true"), and whether it needs loss scaling."""

    name: str
    dtype: torch.dtype
    mixed: bool
    scaled: bool
    fp8: bool = False  # linear layers with fp8 operands (the "fp8" autocast rule, mixprec.fp8)

    @property
    def half_weights(self) -> bool:
        return not self.mixed and self.dtype in (torch.float16, torch.bfloat16)


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("32-true", torch.float32, mixed=False, scaled=False),
    Mode("64-true", torch.float64, mixed=False, scaled=False),
    Mode("16-mixed", torch.float16, mixed=True, scaled=True),
    Mode("bf16-mixed", torch.bfloat16, mixed=True, scaled=False),
    Mode("16-true", torch.float16, mixed=False, scaled=False),
    Mode("bf16-true", torch.bfloat16, mixed=False, scaled=False),
    Mode("fp8-mixed", torch.bfloat16, mixed=True, scaled=False, fp8=True),
    Mode("fp8-mixed-16", torch.float16, mixed=True, scaled=True, fp8=True),
)}
# Fabric's short forms.
ALIASES: dict[Any, str] = {"32": "32-true", 32: "32-true", "64": "64-true", 64: "64-true",
                           "16": "16-mixed", 16: "16-mixed", "bf16": "bf16-mixed",
                           # Fabric's TransformerEngine plugin strings: fp8 linears, the rest bf16 / fp16
                           "transformer-engine": "fp8-mixed", "transformer-engine-float16": "fp8-mixed-16"}


def valid_precisions() -> list[str]:
    return list(MODES) + [str(a) for a in ALIASES if isinstance(a, str)]


def parse_precision(value: str | int | None, source: str = "precision") -> str:
    """The canonical mode name for a precision string or int; ValueError listing the valid ones."""
    if isinstance(value, str):
        value = value.strip()
    if value in MODES:
        return value
    if value in ALIASES and not isinstance(value, bool):
        return ALIASES[value]
    raise ValueError(f"{source}={value!r} is not a precision; expected one of "
                     f"{', '.join(repr(v) for v in valid_precisions())} (or the ints 16, 32, 64)")
