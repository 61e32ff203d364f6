"""`edge-kit bench`: the bundle's int8 model against fp32 ONNX and PyTorch eager, on this host.

The pieces, one job each:
- `plan`: what to measure (engines, test data, settings): explicit paths or resolved by `sources`;
- `sources`: find the fp32 model, checkpoint and held-out split for a bundle (config, MLflow run);
- `worker`: measures one engine in its own child process, so memory figures never mix;
- `runner`: starts the workers with a progress bar and gathers their figures;
- `verdict`: flags an int8 model that is slower than fp32 here, with the likely reason;
- `report`, `charts`, `tracking`: report.json / report.md, PNG charts, the MLflow run.
"""

from edge_kit.bench.plan import BenchPlan, BenchSettings, EngineSpec, TorchModelSpec
from edge_kit.bench.runner import run_bench

__all__ = ["BenchPlan", "BenchSettings", "EngineSpec", "TorchModelSpec", "run_bench"]
