"""PLACEHOLDER (being replaced by the policy-driven autocast): same signature as torch.autocast."""
from __future__ import annotations

import torch


class autocast(torch.amp.autocast):  # noqa: N801 (torch's name)
    def __init__(self, device_type: str, dtype=None, enabled: bool = True, cache_enabled=None, policy=None, record: bool = False):
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
