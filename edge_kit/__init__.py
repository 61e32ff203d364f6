"""edge-kit: train, quantize, sign and ship models to edge devices, and watch them for drift.

Where each stage lives (the folders follow the pipeline; imports only point downstream):

- ``edge_kit/train/``    data snapshot (DVC), models, the deterministic training loop and its
  checkpoints, MLflow tracking, provenance, fp32 ONNX export
- ``edge_kit/compile/``  calibration inputs, int8 quantization (``quantize/ort.py``, ``quantize/inc.py``),
  the accuracy gate and its fp32 fallback, QDQ analysis
- ``edge_kit/ship/``     the build orchestrator, bundle packaging (manifest, reference histograms),
  report, MLflow registry, reproduce
- ``edge_kit/fleet/``    the fleet server: MQTT ingest, storage, drift statistics, alerts, dashboard
- ``edge_kit/bench/``    benchmarks of a bundle on the machine at hand
- ``edge_kit/demo/``     the whole loop on one machine (``make fleet-demo``)
- ``edge_kit/commands/`` one module per CLI command; ``edge_kit/cli.py`` parses and dispatches
- ``edge_kit/config.py``, ``edge_kit/errors.py``  the project config and the exception tree, shared by all

Formats that cross the wire (bundle, manifest, summary payload, MQTT topics) are defined once, in
``device_agent``, which runs on devices and never imports this package.
"""

__all__ = ["__version__"]  # the stage packages above are imported by path; nothing else is re-exported

__version__ = "0.1.0"
