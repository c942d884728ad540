"""The TensorRT conformance lint: each seeded violation is caught and named; our exports pass."""

import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from stepquant.export.lint import LintError, check_conformance, lint


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def build(
    *,
    act_scale=0.05,
    act_zp=np.int8(0),
    weight_scale=None,
    weight_zp=None,
    act_axis_scale=False,
    computed_scale=False,
    output_qdq=False,
    dangling=False,
    residual=False,
    cast_input=None,
    opset=17,
    extra_nodes=(),
):
    """x -> Q -> DQ -> Conv(DQ(int8 weight, per-channel)) -> y: a graph TensorRT accepts unless told otherwise."""
    weight_scale = np.full(4, 0.01, np.float32) if weight_scale is None else weight_scale
    weight_zp = np.zeros(len(weight_scale), np.int8) if weight_zp is None else weight_zp
    inits = [
        const("w_int", np.ones((4, 4, 3, 3), np.int8)),
        const("w_scale", weight_scale),
        const("w_zp", weight_zp),
        const("a_zp", act_zp),
    ]
    nodes = []
    q_input = "x"
    if cast_input is not None:
        nodes.append(helper.make_node("Cast", ["x"], ["x_cast"], to=cast_input, name="cast"))
        q_input = "x_cast"
    if act_axis_scale:
        inits.append(const("a_scale", np.full(4, act_scale, np.float32)))
    elif computed_scale:
        inits.append(const("a_scale_half", np.float32(act_scale / 2)))
        nodes.append(helper.make_node("Add", ["a_scale_half", "a_scale_half"], ["a_scale"], name="scale_add"))
    else:
        inits.append(const("a_scale", np.float32(act_scale)))
    axis = {"axis": 1} if act_axis_scale else {}
    nodes += [
        helper.make_node("QuantizeLinear", [q_input, "a_scale", "a_zp"], ["xq"], name="act_q", **axis),
        helper.make_node(
            "Relu" if dangling else "DequantizeLinear",
            ["xq", "a_scale", "a_zp"][: 1 if dangling else 3],
            ["xdq"],
            name="act_dq",
            **({} if dangling else axis),
        ),
        helper.make_node("DequantizeLinear", ["w_int", "w_scale", "w_zp"], ["w"], name="weight_dq", axis=0),
        helper.make_node("Conv", ["xdq", "w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
    ]
    last = "conv_out"
    if residual:
        inits.append(const("r_scale", np.float32(0.1)))
        nodes += [
            helper.make_node("QuantizeLinear", ["conv_out", "r_scale", "a_zp"], ["rq"], name="branch_q"),
            helper.make_node("DequantizeLinear", ["rq", "r_scale", "a_zp"], ["rdq"], name="branch_dq"),
            helper.make_node("Add", ["rdq", "x"], ["sum"], name="residual_add"),
        ]
        last = "sum"
    if output_qdq:
        inits.append(const("o_scale", np.float32(0.1)))
        nodes += [
            helper.make_node("QuantizeLinear", [last, "o_scale", "a_zp"], ["oq"], name="out_q"),
            helper.make_node("DequantizeLinear", ["oq", "o_scale", "a_zp"], ["y"], name="out_dq"),
        ]
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    nodes += list(extra_nodes)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model) -> set[str]:
    return {finding.rule for finding in lint(model)}


def test_a_conforming_graph_passes():
    assert lint(build()) == []
    check_conformance(build())


@pytest.mark.parametrize(
    "kwargs, rule",
    [
        ({"act_zp": np.int8(3)}, "zero-point-nonzero"),
        ({"weight_zp": np.array([0, 0, 1, 0], np.int8)}, "zero-point-nonzero"),
        ({"act_zp": np.int32(0)}, "zero-point-type"),
        ({"computed_scale": True}, "scale-not-constant"),
        ({"act_scale": -0.05}, "scale-not-positive"),
        ({"act_scale": 0.0}, "scale-not-positive"),
        ({"weight_scale": np.array([0.01, 0.01, np.nan, 0.01], np.float32)}, "scale-not-positive"),
        ({"weight_scale": np.full(3, 0.01, np.float32)}, "scale-shape"),
        ({"act_axis_scale": True}, "per-channel-activation"),
        ({"cast_input": TensorProto.INT32, "opset": 21}, "input-type"),
        ({"output_qdq": True}, "qdq-on-output"),
        ({"dangling": True}, "dangling-quantize"),
        ({"residual": True}, "residual-fusion"),
        ({"opset": 10}, "opset"),
        (
            {
                "extra_nodes": [
                    helper.make_node("QLinearConv", ["a", "b", "c", "d", "e", "f", "g", "h"], ["i"], name="qconv")
                ]
            },
            "unsupported-op",
        ),
    ],
)
def test_each_seeded_violation_is_caught_and_named(kwargs, rule):
    model = build(**kwargs)
    assert rule in rules(model)
    with pytest.raises(LintError, match=rule):
        check_conformance(model)
    finding = next(f for f in lint(model) if f.rule == rule)
    assert finding.node and finding.node in str(finding)


def test_a_quantized_skip_beside_a_direct_conv_output_is_the_wanted_placement():
    # Add(DQ(Q(conv)), conv2): TensorRT fuses the Add into conv2 and reads the skip in INT8
    model = build(residual=True)
    graph = model.graph
    graph.node.append(helper.make_node("Conv", ["xdq", "w"], ["conv2_out"], name="conv2", pads=[1, 1, 1, 1]))
    add = next(n for n in graph.node if n.name == "residual_add")
    add.input[1] = "conv2_out"
    assert "residual-fusion" not in rules(model)


def test_the_demo_bundle_conforms(demo_bundle):
    path, _ = demo_bundle
    assert lint(path / "model.onnx") == []


def test_unreadable_file_is_reported(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(LintError, match="not a readable ONNX model"):
        lint(tmp_path / "bad.onnx")


def test_a_graph_without_quantizers_is_refused_in_one_line(tmp_path, demo_bundle):

    (tmp_path / "empty.onnx").write_bytes(b"")
    for graph, says in (
        (demo_bundle[0] / "model_fp32.onnx", "no QuantizeLinear or DequantizeLinear node"),
        (tmp_path / "empty.onnx", "no node at all"),
    ):
        result = run_cli("stepquant", "lint", graph)
        assert_one_line_error(result, says)
        assert result.returncode == 1 and "not a quantized (Q/DQ) graph" in result.stderr


def test_lint_command_names_each_finding_and_exits_1(tmp_path, demo_bundle):

    onnx.save(build(act_zp=np.int8(3), output_qdq=True), str(tmp_path / "bad.onnx"))
    bad = run_cli("stepquant", "lint", tmp_path / "bad.onnx")
    assert bad.returncode == 1
    assert "[zero-point-nonzero] act_q" in bad.stdout and "[qdq-on-output] out_dq" in bad.stdout
    good = run_cli("stepquant", "lint", demo_bundle[0])
    assert good.returncode == 0 and "conforms" in good.stdout


@pytest.mark.slow
def test_the_cifar10_architecture_export_conforms(tmp_path):
    import torch
    from diffusers import UNet2DModel

    from stepquant.calibrators import calibrate_ranges
    from stepquant.calibrators.data import CalibrationSet
    from stepquant.export.onnx_export import export_onnx
    from stepquant.models import EpsilonModel
    from stepquant.models.reference_configs import DDPM_CIFAR10_UNET
    from stepquant.quant import QuantSpec, quantize_

    torch.manual_seed(0)
    model = EpsilonModel(UNet2DModel(**DDPM_CIFAR10_UNET).eval())
    assert 35.5e6 < sum(p.numel() for p in model.parameters()) < 36e6
    quantize_(model, QuantSpec())
    calibrate_ranges(model, CalibrationSet(torch.randn(2, 3, 32, 32), torch.tensor([900.0, 100.0])), progress=False)
    export_onnx(model, tmp_path / "cifar10.onnx", (3, 32, 32))
    assert lint(tmp_path / "cifar10.onnx") == []
