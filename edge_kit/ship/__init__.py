"""Ship stage: a gated int8 model -> signed device bundle, logged and registered in MLflow.

``build`` orchestrates train (reuse) -> compile -> package; ``package`` writes the manifest, reference
histograms and self-test through ``device_agent.bundle.format``; ``report`` renders report.md; ``registry``
logs and registers in MLflow; ``reproduce`` rebuilds a bundle from its provenance and compares bytes.
"""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
