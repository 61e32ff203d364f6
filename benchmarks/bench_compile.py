"""Compiler benchmark: edge-kit int8 against fp32 and plain ONNX Runtime, side by side, in one run.

Part 1, MobileNetV2 and ResNet-18 at 224x224 (random weights, defined below: torchvision does not
import beside this torch build; nothing downloaded), at batch 1 on 1 thread and batch 16 on 2 threads:
  fp32; fp32 again (a same-model control: its distance from 1.00x is the noise floor of the run);
  edge-kit int8 (ORT backend, target "auto" = the preset for this host, per-channel, minmax);
  plain ORT QDQ per-channel u8/s8 after `quant_pre_process` (TorchScript export, as ORT's docs do);
  plain ORT QOperator (same settings).
All variants of one model and setting are timed interleaved, round after round (a load burst on this
shared machine hits all of them alike); a row's figure is the median latency over the rounds and its
ratio is against fp32 in the same run. Every row carries the host's int8 instruction set.

Part 2, digits: `edge-kit build` of examples/digits end to end (timed, with the candidate search's
share of it), then the shipped model against fp32 (with the same in-graph standardisation, and an
fp32 control) at batch 1 and 16 on 1 thread, fed raw digits images.

Part 3, the agent's overhead on that bundle: `Agent.predict` with monitoring off and with summaries
on against a bare ONNX Runtime session on the same model bytes, batch 1 and 32, interleaved.

Usage: python benchmarks/bench_compile.py [--quick] [--skip-digits]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import print_table, time_repeated, write_result  # noqa: E402

# --- MobileNetV2 (Sandler et al. 2018), width 1.0, defined here so nothing is downloaded ----------


def _random_bn_statistics(model: Any) -> Any:
    """Random BN statistics, so activations have realistic, layer-dependent ranges (seeded by the caller)."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model

def mobilenet_v2(num_classes: int = 1000) -> Any:
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1, 1)] if expand != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, act=False)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.block(x) if self.residual else self.block(x)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
    cin = 32
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(conv_bn(cin, 1280, 1, 1))

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(1280, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    torch.manual_seed(0)
    return _random_bn_statistics(MobileNetV2().eval())


# --- ResNet-18 (He et al. 2016), defined here for the same reason ----------------------------------

def resnet18(num_classes: int = 1000) -> Any:
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(y + self.down(x))

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))

    torch.manual_seed(0)
    return _random_bn_statistics(ResNet18().eval())


# --- quantizers under comparison ---------------------------------------------------------------

class _Reader:
    def __init__(self, x: np.ndarray, name: str = "input", batch: int = 8) -> None:
        self.x, self.name, self.batch, self.i = x, name, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        b = self.x[self.i : self.i + self.batch]
        self.i += self.batch
        return {self.name: b}

    def rewind(self) -> None:
        self.i = 0


def export(model: Any, path: Path, dynamo: bool) -> Path:
    import torch

    example = (torch.randn(1, 3, 224, 224),)
    if dynamo:
        torch.onnx.export(model, example, str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True, verbose=False,
                          external_data=False)
    else:  # TorchScript export, what ORT's quantization docs start from
        torch.onnx.export(model, example, str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def plain_ort(fp32: Path, out: Path, calib: np.ndarray, fmt: str) -> Path:
    """ORT's recommended recipe: quant_pre_process, then quantize_static per-channel u8 activations, s8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(calib),
                    quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def edge_kit_int8(fp32: Path, workdir: Path, calib: np.ndarray) -> Path:
    """What `edge-kit build` quantizes (ORT backend, target auto, per-channel, minmax) before its search."""
    from calibration import select_calibration
    from edge_kit.compile.quantize.ort_quantizer import make_ort_quantizer
    from edge_kit.config import QuantizeSection

    sel = select_calibration(list(range(len(calib))), len(calib), seed=0)
    q = make_ort_quantizer(QuantizeSection(target="auto"), fp32, workdir, calib, sel, None)
    return q.quantize((), "bench")


def latencies(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int, calls: int) -> dict[str, float]:
    """Median ms per call for each model, timed interleaved (a, b, c, a, b, c, ...)."""
    from edge_kit.compile.evaluate import session

    runners = {}
    for name, path in paths.items():
        sess = session(path, threads=threads)
        feed = {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
        for _ in range(2):
            sess.run(None, feed)
        runners[name] = (sess, feed)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (sess, feed) in runners.items():
            t = time_repeated(lambda sess=sess, feed=feed: sess.run(None, feed), repeat=calls, warmup=0)
            samples[name].append(1000.0 * t["median"])
    return {name: float(np.median(v)) for name, v in samples.items()}


def side_by_side(label: str, model: Any, tmp: Path, rounds: int, isa: str, calib_n: int = 16) -> list[dict[str, Any]]:
    from edge_kit.compile.evaluate import predict_logits
    from edge_kit.compile.fusion import fused_int8_ops

    rng = np.random.default_rng(0)
    calib = rng.normal(size=(calib_n, 3, 224, 224)).astype(np.float32)
    probe = rng.normal(size=(16, 3, 224, 224)).astype(np.float32)
    fp32 = export(model, tmp / f"{label}-fp32.onnx", dynamo=True)
    control = tmp / f"{label}-fp32-control.onnx"
    shutil.copy(fp32, control)
    ts = export(model, tmp / f"{label}-fp32-ts.onnx", dynamo=False)
    paths = {
        "fp32": fp32,
        "fp32 (control)": control,
        "edge-kit int8": edge_kit_int8(fp32, tmp / f"{label}-ek", calib),
        "ORT QDQ per-channel u8/s8": plain_ort(ts, tmp / f"{label}-qdq.onnx", calib, "QDQ"),
        "ORT QOperator": plain_ort(ts, tmp / f"{label}-qop.onnx", calib, "QOperator"),
    }
    ref = predict_logits(fp32, probe, batch_size=16).argmax(axis=1)
    agree = {n: float(np.mean(predict_logits(p, probe, batch_size=16).argmax(axis=1) == ref)) for n, p in paths.items()}
    rows = []
    for batch, threads in ((1, 1), (16, 2)):
        ms = latencies(paths, probe[:batch], threads, rounds, calls=3 if batch == 1 else 1)
        for name, path in paths.items():
            kernels = fused_int8_ops(path)
            rows.append({"model": label, "batch": batch, "threads": threads, "variant": name,
                         "ms": ms[name], "vs_fp32": ms["fp32"] / ms[name], "size_kib": model_size(path) / 1024,
                         "top1_agree": agree[name], "int8_kernels": sum(kernels.values()), "host_isa": isa})
    return rows


def model_size(path: Path) -> int:
    """Bytes of the model including any external-data files next to it."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


# --- the two workloads ---------------------------------------------------------------------------

def digits_build(tmp: Path) -> tuple[float, dict[str, Any]]:
    """`edge-kit keygen` + `edge-kit build` of examples/digits in a fresh git + DVC project, timed."""
    project = tmp / "digits"
    project.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), DVC_NO_ANALYTICS="1")
    env.pop("MLFLOW_TRACKING_URI", None)

    def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True, text=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "bench@example.com")
    sh("git", "config", "user.name", "bench")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    shutil.copy(REPO / "examples" / "digits" / "edgekit.toml", project / "edgekit.toml")
    (project / ".gitignore").write_text(".edgekit/\ndist/\n.keys/\n")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "digits")
    t0 = time.perf_counter()
    sh(sys.executable, "-m", "edge_kit", "keygen", "--out", ".keys")
    res = sh(sys.executable, "-m", "edge_kit", "build", "--config", "edgekit.toml", "--out", "dist",
             "--key", ".keys/edgekit.key", "--json")
    elapsed = time.perf_counter() - t0
    import json

    return elapsed, json.loads(res.stdout) | {"project": str(project)}


def digits_rows(tmp: Path, build: dict[str, Any], rounds: int, isa: str) -> list[dict[str, Any]]:
    """The shipped digits model against the fp32 model it came from, at the search's settings and batch 16."""
    import onnx

    from device_agent.bundle.format import read_bundle
    from edge_kit.compile.preprocess_graph import embed_preprocessing
    from edge_kit.config import load_config

    config = load_config(Path(build["project"]) / "edgekit.toml")
    bundle = read_bundle(Path(build["project"]) / build["bundle"])
    run_dir = config.workdir / "runs" / build["run_id"]
    # The fp32 model as an fp32 bundle would carry it: standardisation inside the graph, like the shipped one.
    fp32 = tmp / "digits-fp32.onnx"
    preprocessing = bundle.manifest["model"]["preprocessing"]
    onnx.save(embed_preprocessing(onnx.load(str(next(run_dir.rglob("*.onnx")))), preprocessing), str(fp32))
    control = tmp / "digits-fp32-control.onnx"
    shutil.copy(fp32, control)
    shipped = tmp / "digits-shipped.onnx"
    shipped.write_bytes(bundle.model_bytes)
    from sklearn.datasets import load_digits

    x = load_digits().images[:16, None].astype(np.float32)  # raw pixels 0..16: both models standardise
    rows = []
    chosen = bundle.manifest["quantization"].get("search", {}).get("chosen", {}).get("name", "gate's choice")
    for batch in (1, 16):
        paths = {"fp32": fp32, "fp32 (control)": control, f"shipped: {chosen}": shipped}
        ms = latencies(paths, x[:batch], 1, rounds, calls=200)
        for name, path in paths.items():
            rows.append({"model": "digits", "batch": batch, "threads": 1, "variant": name, "ms": ms[name],
                         "vs_fp32": ms["fp32"] / ms[name], "size_kib": model_size(path) / 1024,
                         "top1_agree": None, "int8_kernels": None, "host_isa": isa})
    return rows


def agent_overhead(bundle: Path, quick: bool) -> dict[str, Any]:
    """`Agent.predict` (monitoring off / summaries on) against a bare session on the same digits bundle,
    batch 1 and 32: with preprocessing in the graph both are fed raw inputs (benchmarks/bench_agent.py)."""
    from benchmarks.bench_agent import throughput

    rows, figures = throughput(bundle, quick)
    print_table(rows)
    return figures | {"rows": rows}


def main() -> None:
    from device_agent.host import host_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--skip-digits", action="store_true", help="only the side-by-side models")
    args = parser.parse_args()
    rounds = 3 if args.quick else 6
    host = host_info()
    isa = f"{host['cpu']}, {host['int8_isa']}"
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp_name:
        tmp = Path(tmp_name)
        calib_n = 8 if args.quick else 16
        rows += side_by_side("mobilenetv2", mobilenet_v2(), tmp, rounds, isa, calib_n)
        rows += side_by_side("resnet18", resnet18(), tmp, rounds, isa, calib_n)
        if not args.skip_digits:
            build_seconds, build = digits_build(tmp)
            rows += digits_rows(tmp, build, rounds, isa)
            figures |= {"digits_build_seconds": build_seconds, "digits_build_timings": build.get("timings")}
            figures["agent_overhead"] = agent_overhead(Path(build["project"]) / build["bundle"], args.quick)
    print_table(rows)
    if "digits_build_timings" in figures:
        t = figures["digits_build_timings"] or {}
        print(f"\nwhole digits build: {figures['digits_build_seconds']:.1f} s, of which the candidate search "
              f"{t.get('candidate search', 0):.1f} s")
    out = write_result("compile", figures | {"rows": rows}, rounds=rounds,
                       conditions="ORT CPUExecutionProvider; batch 1 on 1 intra-op thread, batch 16 on 2; the "
                                  "variants of one model and setting timed interleaved; ms = median over rounds; "
                                  "vs_fp32 = fp32 ms / variant ms in the same run; fp32 (control) = the same "
                                  "fp32 model timed as another variant (noise floor)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
