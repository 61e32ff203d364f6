"""The candidate search: timed on this host, fastest passing candidate shipped, gate failures never shipped."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from calibration import select_calibration
from edge_kit.compile.evaluate import accuracy, predict_logits
from edge_kit.compile.gate import Candidate, GateResult, run_gate
from edge_kit.compile.quantize.ort_quantizer import OrtQuantizer, make_ort_quantizer
from edge_kit.compile.search import TIE_TOLERANCE, Decision, edge_specs, score, search_candidates
from edge_kit.config import GateSection, QuantizeSection
from edge_kit.ship.report import render_candidates
from tests.helpers.tiny_models import TinyCase, export_onnx

pytestmark = pytest.mark.slow


def _build(case: TinyCase, tmp: Path, gate: GateSection, **settings: object) -> tuple[OrtQuantizer, Decision]:
    q_settings = QuantizeSection(**({"target": "auto"} | settings))  # type: ignore[arg-type]
    sel = select_calibration(list(range(len(case.x_train))), 128, seed=0)
    q = make_ort_quantizer(q_settings, case.onnx, tmp, case.x_train[sel.positions], sel, None)
    fp32 = accuracy(predict_logits(q.fp32_path, case.x_test), case.y_test)
    result = run_gate(gate=gate, fp32_metric=fp32, quantize=q.quantize,
                      evaluate=lambda p: accuracy(predict_logits(p, case.x_test), case.y_test), units=q.units)
    assert result.passed
    decision = search_candidates(q, result, q.settings, gate, case.x_test, case.y_test)
    assert decision is not None
    return q, decision


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _Convs(nn.Module):
    """Enough multiply-accumulates per call (about 40 M at 48x48) for int8 kernels to beat fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1), \
            nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _labelled_by_fp32(model: nn.Module, x: np.ndarray, path: Path) -> TinyCase:
    """Random weights, labels = fp32's own predictions: the gate then measures agreement with fp32."""
    export_onnx(model.eval(), torch.from_numpy(x[:2]), path)
    y = predict_logits(path, x).argmax(axis=1)
    half = len(x) // 2
    return TinyCase(path, x[:half], y[:half], x[half:], y[half:])


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    return _labelled_by_fp32(_Mlp(), x, tmp_path_factory.mktemp("mlp") / "fp32.onnx")


@pytest.fixture(scope="module")
def conv_case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 3, 48, 48)).astype(np.float32)
    return _labelled_by_fp32(_Convs(), x, tmp_path_factory.mktemp("conv") / "fp32.onnx")


LOOSE = GateSection(max_drop=0.2, max_fallback_rounds=0)


def _fastest(d: Decision, include_fp32: bool) -> float:
    return min(c.p50 or np.inf for c in d.candidates
               if c.passed and c.p50 is not None and (include_fp32 or c.spec.precision == "int8"))


def test_tiny_mlp_whose_int8_is_slower_ships_fp32_when_allowed_and_says_so_when_not(mlp_case: TinyCase,
                                                                                     tmp_path: Path) -> None:
    _, allowed = _build(mlp_case, tmp_path / "a", LOOSE, allow_fp32=True, search_seconds=1.0)
    assert allowed.chosen.spec.precision == "fp32"  # Q/DQ overhead dwarfs a 16x32x4 MLP's maths
    assert allowed.chosen.p50 is not None and allowed.chosen.p50 <= _fastest(allowed, True) * (1 + TIE_TOLERANCE)

    _, default = _build(mlp_case, tmp_path / "d", LOOSE, search_seconds=1.0)
    assert default.chosen.spec.precision == "int8"  # allow_fp32 is off by default
    assert default.chosen.p50 is not None and default.chosen.p50 <= _fastest(default, False) * (1 + TIE_TOLERANCE)
    fp32 = default.fp32
    assert fp32 is not None and fp32.rejected == "fp32 is not shipped unless quantize.allow_fp32 = true"
    note = default.fp32_faster_note()
    assert note is not None and note.startswith("fp32 was faster on this host")
    report = "\n".join(render_candidates(default, "accuracy"))
    assert "Fp32 was faster on this host" in report and "**shipped**" in report
    assert len(default.candidates) >= 4  # per-channel, per-tensor, dense layers fp32, fp32
    assert all(c.p50 is not None for c in default.candidates if c.rejected is None or "slower" in c.rejected)


def test_with_fp32_allowed_the_conv_model_ships_what_its_own_timing_favours(conv_case: TinyCase,
                                                                           tmp_path: Path) -> None:
    """fp32 ships only when measured faster beyond the tie tolerance; on a tie the smaller int8 ships.

    Which precision is faster is the host's business (a VNNI host, an AVX2 one, a loaded one: the
    benchmarks measure it); the rule that turns the measurements into a choice is asserted here.
    """
    _, d = _build(conv_case, tmp_path, LOOSE, allow_fp32=True, search_seconds=2.0)
    fp32 = d.fp32
    assert fp32 is not None and fp32.p50 is not None and d.chosen.p50 is not None
    int8 = [c for c in d.candidates if c.passed and c.spec.precision == "int8" and c.p50 is not None]
    assert int8, [c.to_json() for c in d.candidates]
    best_int8 = min(c.p50 for c in int8 if c.p50 is not None)
    if best_int8 <= fp32.p50 * (1 + TIE_TOLERANCE):
        assert d.chosen.spec.precision == "int8", [c.to_json() for c in d.candidates]
    else:
        assert d.chosen is fp32, [c.to_json() for c in d.candidates]
    assert d.chosen.p50 <= _fastest(d, include_fp32=True) * (1 + TIE_TOLERANCE)


def test_objective_and_time_budget_are_respected(conv_case: TinyCase, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    _, small = _build(conv_case, tmp_path / "s", LOOSE, objective="size", search_seconds=0.3)
    passing_int8 = [c for c in small.candidates if c.passed and c.spec.precision == "int8"]
    assert small.chosen.size == min(c.size for c in passing_int8)
    assert small.spent_s < 0.3 + 2.0  # the budget, plus at most one interleaved round
    assert time.perf_counter() - t0 < 120

    _, tput = _build(conv_case, tmp_path / "t", LOOSE, objective="throughput", batch_size=4, threads=1,
                     search_seconds=0.5)
    assert tput.batch_size == 4 and tput.threads == 1
    best = min(score(c, "throughput") for c in tput.candidates if c.rejected is None or c is tput.chosen)
    assert score(tput.chosen, "throughput") <= best * (1 - TIE_TOLERANCE) or \
        abs(score(tput.chosen, "throughput") - best) <= TIE_TOLERANCE * abs(best)


def test_candidates_failing_the_gate_are_never_shipped(outlier_case: TinyCase, tmp_path: Path) -> None:
    """Plain int8 is at chance on the outlier MLP (and the smallest file): the size objective would love it."""
    gate = GateSection(max_drop=0.02, max_fallback_rounds=4)
    _, d = _build(outlier_case, tmp_path, gate, objective="size", search_seconds=0.3)
    plain = next(c for c in d.candidates if c.spec.name.startswith("int8 (") and not c.spec.excluded_nodes)
    assert not plain.passed and plain.rejected is not None and plain.rejected.startswith("failed the accuracy gate")
    assert d.chosen.passed and d.chosen is not plain
    assert all(c.passed for c in d.candidates if c.rejected is None)


def test_search_off_ships_the_gates_choice(mlp_case: TinyCase, tmp_path: Path) -> None:
    sel = select_calibration(list(range(len(mlp_case.x_train))), 64, seed=0)
    q = make_ort_quantizer(QuantizeSection(search_seconds=0.0), mlp_case.onnx, tmp_path,
                           mlp_case.x_train[sel.positions], sel, None)
    result = run_gate(gate=LOOSE, fp32_metric=1.0, quantize=q.quantize, evaluate=lambda p: 1.0, units=q.units)
    assert search_candidates(q, result, q.settings, LOOSE, mlp_case.x_test, mlp_case.y_test) is None


def test_replay_rebuilds_the_recorded_candidate_byte_for_byte_without_timing(mlp_case: TinyCase,
                                                                             tmp_path: Path) -> None:
    q, d = _build(mlp_case, tmp_path / "a", LOOSE, search_seconds=0.5)
    record = d.to_manifest({})
    q2 = make_ort_quantizer(q.settings, mlp_case.onnx, tmp_path / "b",
                            *_calib(mlp_case))
    result = run_gate(gate=LOOSE, fp32_metric=1.0, quantize=q2.quantize,
                      evaluate=lambda p: accuracy(predict_logits(p, mlp_case.x_test), mlp_case.y_test), units=q2.units)
    again = search_candidates(q2, result, q2.settings, LOOSE, mlp_case.x_test, mlp_case.y_test, replay=record)
    assert again is not None and again.replayed and again.spent_s == 0.0
    assert again.chosen.spec == d.chosen.spec
    assert again.chosen.path.read_bytes() == d.chosen.path.read_bytes()


def _calib(case: TinyCase) -> tuple[np.ndarray, object, None]:
    sel = select_calibration(list(range(len(case.x_train))), 128, seed=0)
    return case.x_train[sel.positions], sel, None


def test_int8_candidates_under_the_coverage_floor_are_not_shipped(mlp_case: TinyCase, tmp_path: Path) -> None:
    gate = GateSection(max_drop=0.2, max_fallback_rounds=0, min_int8_coverage=0.5)
    _, d = _build(mlp_case, tmp_path, gate, search_seconds=0.3)
    dense = next(c for c in d.candidates if c.spec.name == "int8 convs, dense layers fp32")
    assert dense.coverage == 0.0 and dense.rejected is not None and "gate.min_int8_coverage" in dense.rejected
    assert d.chosen.coverage == 1.0


def test_edge_candidates_add_the_first_layer_and_the_outputs_to_the_gates_choice(tmp_path: Path) -> None:
    """Pure spec logic (no timing): every edge candidate keeps what the gate kept float, and adds to it."""
    best = Candidate(1, ("conv3",), tmp_path / "r1.onnx", 0.9, (), ("cat",))
    gate = GateResult("accuracy", 0.9, 0.01, None, [best], best)
    specs = {s.name: s for s in edge_specs(gate, "conv1", ("logits",), per_channel=True)}
    assert specs["int8 (per-channel), first layer fp32"].excluded_nodes == ("conv1", "conv3")
    assert specs["int8 (per-channel), first layer fp32"].float_tensors == ("cat",)
    assert specs["int8 (per-channel), float outputs"].excluded_nodes == ("conv3",)
    assert specs["int8 (per-channel), float outputs"].float_tensors == ("cat", "logits")
    both = specs["int8 (per-channel), first layer fp32, float outputs"]
    assert (both.excluded_nodes, both.float_tensors) == (("conv1", "conv3"), ("cat", "logits"))
    # Nothing new to add: no duplicate candidates.
    assert edge_specs(gate, "conv3", ("cat",), per_channel=False) == []
    assert [s.name for s in edge_specs(gate, None, ("logits",), per_channel=False)] == [
        "int8 (per-tensor), float outputs"]


def test_replay_rebuilds_an_edge_candidate_with_its_float_tensors_byte_for_byte(mlp_case: TinyCase,
                                                                                tmp_path: Path) -> None:
    q, d = _build(mlp_case, tmp_path / "a", LOOSE, search_seconds=0.3)
    edge = next(c for c in d.candidates if c.spec.name.endswith("float outputs") and c.spec.float_tensors)
    assert edge.spec.float_tensors == ("logits",)
    record = d.to_manifest({}) | {"chosen": edge.spec.to_json()}  # as if the timing had picked it
    q2 = make_ort_quantizer(q.settings, mlp_case.onnx, tmp_path / "b", *_calib(mlp_case))
    result = run_gate(gate=LOOSE, fp32_metric=1.0, quantize=q2.quantize,
                      evaluate=lambda p: accuracy(predict_logits(p, mlp_case.x_test), mlp_case.y_test), units=q2.units)
    again = search_candidates(q2, result, q2.settings, LOOSE, mlp_case.x_test, mlp_case.y_test, replay=record)
    assert again is not None and again.chosen.spec == edge.spec
    assert again.chosen.path.read_bytes() == edge.path.read_bytes()


def test_a_backend_without_node_control_offers_its_own_model_and_fp32_only(mlp_case: TinyCase,
                                                                          tmp_path: Path) -> None:
    """The search asks the quantizer what it can do (`node_control`), not which class it is."""
    from edge_kit.compile.quantize.inc import IncQuantizer
    from edge_kit.errors import UsageError

    q, d = _build(mlp_case, tmp_path / "a", LOOSE, search_seconds=0.3)
    inc = IncQuantizer(q.fp32_path, q.quantize((), "plain"), {"backend": "inc"})  # an int8 model, made elsewhere
    assert inc.node_control is None and q.node_control is q
    result = run_gate(gate=LOOSE, fp32_metric=1.0, quantize=inc.quantize,
                      evaluate=lambda p: accuracy(predict_logits(p, mlp_case.x_test), mlp_case.y_test),
                      units=inc.units)
    own = search_candidates(inc, result, q.settings, LOOSE, mlp_case.x_test, mlp_case.y_test)
    assert own is not None
    assert sorted(c.spec.name for c in own.candidates) == ["fp32", "int8 (inc)"]
    # A recorded ORT variant cannot be rebuilt by it: a clear refusal, not a wrong model.
    edge = next(c for c in d.candidates if c.spec.float_tensors)
    with pytest.raises(UsageError, match="the inc backend cannot build candidate"):
        search_candidates(inc, result, q.settings, LOOSE, mlp_case.x_test, mlp_case.y_test,
                          replay={"chosen": edge.spec.to_json()})
