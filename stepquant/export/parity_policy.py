"""One parity policy: from a graph's target, format and precision to what the export's gate compares and how.

The gate is layer-wise (export/layerwise.py): scales, zero points and integer weights bit-equal, and each
quantizer's codes against the simulation's for the graph's own input to it. A correct graph differs only
where torch and onnxruntime round a float sum differently and a value sits on a grid midpoint: one step,
for a small share of the codes. Two or more steps apart means the graph computes something else.
The end-to-end error (the graph's output against the simulation's) is reported and drives only the
replay on other machines (`stepquant parity`), where no layer-wise comparison is possible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

AS_WRITTEN = "disable"  # onnxruntime's optimisations off: the Q/DQ nodes run as written (see `parity_policy`)


@dataclass(frozen=True)
class ParityPolicy:
    """What the layer-wise gate allows for one kind of graph, and the floor of the end-to-end replay."""

    optimization_level: str  # onnxruntime's, for running the graph against the simulation
    max_one_step_share: float  # of one quantizer's codes, one grid step from the simulation's
    max_multi_step_share: float  # of one quantizer's codes, two or more steps from the simulation's
    tie_allowance: int  # codes per quantizer that may differ whatever its size (small tensors: a tie is a large share)
    replay_floor: float  # least median relative error tolerated end to end by `stepquant parity`
    # one-step share allowed where a device's engine fuses each layer (export/segments.py): it requantizes an
    # exact sum and breaks ties its own way. Measured on the demos' segments (docs/benchmarks/parity.md), worst
    # correct quantizer against the weakest seeded fault: INT8 0.02% against 4.9%; FP8 0.53% (OpenVINO's
    # attention output) against 14%; FP16 graphs 0.61% against 6.4%.
    engine_one_step_share: float

    def allowed_one_step(self, codes: int) -> int:
        return max(self.tie_allowance, int(self.max_one_step_share * codes))

    def allowed_multi_step(self, codes: int) -> int:
        return int(self.max_multi_step_share * codes)


# measured margins: docs/benchmarks/parity.md (tools/bench_parity.py)
_INT8 = ParityPolicy(
    AS_WRITTEN,
    max_one_step_share=1e-3,
    max_multi_step_share=0.0,
    tie_allowance=4,
    replay_floor=1e-2,
    engine_one_step_share=5e-3,
)
_FP8 = ParityPolicy(
    AS_WRITTEN,
    max_one_step_share=1e-3,
    max_multi_step_share=0.0,
    tie_allowance=4,
    replay_floor=3e-2,
    engine_one_step_share=2e-2,
)
_FP16 = ParityPolicy(
    AS_WRITTEN,
    max_one_step_share=0.1,
    max_multi_step_share=1e-4,
    tie_allowance=4,
    replay_floor=0.2,
    engine_one_step_share=2e-2,
)


def parity_policy(target: str, format: str, precision: str) -> ParityPolicy:
    """The policy for a graph of `target` ('tensorrt', 'onnxruntime-cpu') in `format` ('int8', 'fp8') and
    `precision` ('fp32', 'fp16').

    Every graph runs with onnxruntime's optimisations off: the Q/DQ nodes then run as written, which is
    what the simulation computes and what TensorRT is given (fused, a QLinearConv requantizes an exact
    integer accumulator and breaks ties its own way, and saturates on x86 CPUs without VNNI; with FP8 Q
    outputs exposed, onnxruntime 1.30's 'basic' level moves a Transpose onto FP8 tensors it cannot run)."""
    if format == "fp8":
        return _FP8
    return _FP16 if precision == "fp16" else _INT8


def engine_policy(policy: ParityPolicy) -> ParityPolicy:
    """`policy` for a graph's segments run by a device's engine (export/segments.py), whose reference is
    onnxruntime running the same graph as written (not the simulation the gate compares with)."""
    return replace(policy, max_one_step_share=policy.engine_one_step_share)
