"""Training stage: data snapshot -> model -> deterministic, resumable training -> MLflow run -> fp32 ONNX.

``run`` is the entry point (``train``: lock, reuse, the local engine or ``ray_engine``); ``trainer`` the
loop both engines run; ``run_record`` what a run records at its start and end (``TrainResult``);
``checkpoint`` the atomic, resumable checkpoints; ``data`` and ``snapshot`` the DVC-tracked data;
``models`` the factories and ``load_trained_model``; ``tracking`` and ``provenance`` what every run
records; ``export`` the checked fp32 ONNX; ``ray_cluster`` reaching Ray.
"""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
