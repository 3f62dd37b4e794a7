"""Round trips of real pretrained models shipped in PyPI wheels (magika, rapidocr).

Each is quantized with 256 equal-width bins over its float tensors of >= 1024
elements (initializers and Constant nodes alike), written to a .moub and
decoded: quantized weights must equal the dequantized values bit for bit,
everything else must be byte-identical, onnxruntime must run the decoded
model, and ``moub_runtime.InferenceSession`` must give exactly the outputs of
a session on ``moub_runtime.load``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import modelzoo
import moub_runtime
from moub_converters.encode import dequantize, encode_model
from moub_format import dtypes
from moub_format.writer import write_atomic
from moub_runtime.payload import clear_payload
from moub_runtime.sites import tensor_sites

MODELS = {
    "magika": ("magika", "models/standard_v3_3/model.onnx"),
    "cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
}


def model_file(name: str) -> Path:
    package, relative = MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed (pip install '.[models]')")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def feeds(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "magika":
        return {"bytes": rng.integers(0, 257, (2, 2048)).astype(np.int32)}
    shape = {"cls": (1, 3, 48, 192), "rec": (1, 3, 48, 320), "det": (1, 3, 96, 128)}[name]
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def without(model: onnx.ModelProto, paths) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    sites = tensor_sites(copy)
    for path in paths:
        clear_payload(sites[path].tensor)
    return copy.SerializeToString(deterministic=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_round_trip(name, tmp_path):
    model = onnx.load(model_file(name))
    codebook, assignments = modelzoo.equal_width_assignments(model, k=256, min_elements=1024)
    assert len(assignments) >= 3
    if name != "magika":  # PP-OCR keeps its weights in Constant nodes, and they are quantized too
        assert any(p.startswith("node:") and p.endswith("/value") for p in assignments)
    path = tmp_path / f"{name}.moub"
    write_atomic(path, encode_model(model, [codebook], assignments, {"moub.source": name}))
    assert path.stat().st_size < 0.35 * model.ByteSize()

    loaded = moub_runtime.load(path)
    sites = tensor_sites(loaded)
    for site_path, assignment in assignments.items():
        tensor = sites[site_path].tensor
        expected = dequantize(codebook, assignment.indices, tensor.data_type)
        assert tensor.raw_data == expected.tobytes(), site_path
    # Everything but the quantized payloads: nodes, opsets, metadata, other tensors, byte for byte.
    assert without(loaded, assignments) == without(model, assignments)

    inputs = feeds(name)
    reference = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    direct = moub_runtime.InferenceSession(path).run(None, inputs)
    for a, b in zip(reference, direct):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    assert all(np.isfinite(out).all() for out in direct)
    assert [o.shape for o in original] == [o.shape for o in direct]


@pytest.mark.slow
def test_cls_with_every_float_tensor_in_packs(tmp_path):
    """Format 1.2 on a real model: every float tensor of >= 2 elements quantized with its
    own step (std / 16); big tensors one pack each with a grid codebook and own table, the
    186 small ones (BatchNorm vectors, biases) one shared pack; LZMA graph, alignment 8.
    Members decode bit-exactly, the rest is byte-identical, onnxruntime runs it, and the
    file is far smaller than the same quantization as one Tensor per site (which decodes
    to the same model)."""
    import packing
    from moub_format import constants as C
    from moub_format import writer

    model = onnx.load(model_file("cls"))
    codebooks, packs = packing.adaptive_layout(model, divisor=16.0)
    members = [p for pack in packs for p in pack.paths]
    assert len(members) == len(packing.float_paths(model)) and len(packs[-1].paths) > 100
    data = encode_model(model, codebooks, {}, {"moub.source": "cls"}, packs=packs,
                        graph_codec=C.CODEC_LZMA, raw_codec=writer.SMALLEST, alignment=8)
    path = tmp_path / "cls.moub"
    write_atomic(path, data)

    loaded = moub_runtime.load(path)
    sites = tensor_sites(loaded)
    for site_path, expected in packing.expected_members(model, codebooks, packs).items():
        assert sites[site_path].tensor.raw_data == expected, site_path
    assert without(loaded, members) == without(model, members)

    inputs = feeds("cls")
    reference = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    direct = moub_runtime.InferenceSession(path).run(None, inputs)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    for a, b, o in zip(reference, direct, original):
        assert np.array_equal(a, b)
        assert a.shape == o.shape and np.isfinite(a).all()  # fidelity is the converter's business: std/16 is coarse

    tensor_codebooks, assignments = packing.as_tensors(model, codebooks, packs)
    one_per_site = encode_model(model, tensor_codebooks, assignments, {"moub.source": "cls"})
    assert moub_runtime.load(path).SerializeToString() == _loaded_bytes(tmp_path, one_per_site)
    assert len(data) < 0.6 * len(one_per_site), (len(data), len(one_per_site))


def _loaded_bytes(tmp_path, data: bytes) -> bytes:
    path = tmp_path / "other.moub"
    path.write_bytes(data)
    return moub_runtime.load(path).SerializeToString()
