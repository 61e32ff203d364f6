"""Compile stage: fp32 ONNX -> calibrated int8 model that passes the accuracy gate.

``quantize`` chooses and drives a backend (``quantize/ort_quantizer.py`` over ``quantize/ort.py``, ONNX
Runtime; ``quantize/inc.py``, Intel Neural Compressor); ``gate`` measures every candidate and repairs
failures with ``fallback`` layers and ``float_tensors`` ranked by recovered accuracy (``sqnr`` orders the
trials on big models); ``search`` times the passing candidates on this host; ``coverage`` and
``qdq_analysis`` say what runs in int8; ``evaluate`` runs a model on the held-out split. May use the
train stage, never the ship stage.
"""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
