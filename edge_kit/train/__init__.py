"""Training stage: data snapshot -> model -> deterministic, resumable training -> MLflow run -> fp32 ONNX.

``trainer`` is the loop and orchestration (``train``, ``load_trained_model``); ``checkpoint`` the atomic,
resumable checkpoints; ``data`` and ``snapshot`` the DVC-tracked data; ``models`` the factories;
``tracking`` and ``provenance`` what every run records; ``export`` the checked fp32 ONNX.
"""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
