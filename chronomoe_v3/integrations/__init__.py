"""Adapters for the MoE layers of other libraries, registered when a model needs them.

Nothing here imports a third-party library: `register_adapters_for(model)` looks at which packages the
classes of `model`'s modules come from and imports our matching integration only then (`transformers` ->
`chronomoe_v3.integrations.hf`). `ChronoSystem` calls it during discovery, so `ChronoSystem(hf_model)` works
with no extra import; importing `chronomoe_v3.integrations.hf` yourself registers the same adapters up front
(e.g. to call `adapter_for` on a block before any system exists). `chronomoe_v3.integrations.hf_trainer`
(`ChronoCallback`, the Hugging Face Trainer callback) is imported only by the code that uses it.
"""

from __future__ import annotations

from torch import nn


def register_adapters_for(model: nn.Module) -> None:
    """Register the adapters for the libraries `model`'s module classes come from, and refuse (ValueError) an
    MoE block of such a library that no adapter supports. A no-op for models made of other classes."""
    packages = {type(m).__module__.partition(".")[0] for m in model.modules()}
    if "transformers" in packages:
        from .hf import check_supported, register_hf_adapters

        register_hf_adapters()
        check_supported(model)
