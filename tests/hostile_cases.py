"""The reproductions of the hostile-file report, built byte by byte (no tests here).

Each builder returns the bytes of one crafted file (or writes a converter input), made with
``test_hostile_kit`` like the rest of the corpus, so that a test can assert what the reader
does with it and ``tools/hostile_repro.py`` can measure it in a fresh process. Builders take a
size where the report's file is big: the tests use small ones, the script the report's.
"""

from __future__ import annotations

import copy
import hashlib
import lzma
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import test_hostile_kit as K
from moub_format import constants as C
from moub_format import huffman

SECRET_NAME = "secret.txt"   # the file an external-data reference names, relative to the working folder
SECRET_LENGTH = 16


# ---------------------------------------------------------------- external data outside initializers


def _external(tensor: TensorProto, location: str = SECRET_NAME, length: int = SECRET_LENGTH) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _secret_values(length: int = SECRET_LENGTH) -> TensorProto:
    """A uint8 tensor of ``length`` elements whose bytes live in SECRET_NAME."""
    return _external(helper.make_tensor("leak", TensorProto.UINT8, [length], np.zeros(length, np.uint8).tobytes(), raw=True),
                     length=length)


def _sparse_secret(name: str, location: str = SECRET_NAME) -> onnx.SparseTensorProto:
    values = _external(helper.make_tensor(f"{name}_values", TensorProto.UINT8, [SECRET_LENGTH],
                                          np.zeros(SECRET_LENGTH, np.uint8).tobytes(), raw=True), location)
    indices = numpy_helper.from_array(np.arange(SECRET_LENGTH, dtype=np.int64), f"{name}_indices")
    sparse = helper.make_sparse_tensor(values, indices, [SECRET_LENGTH])
    sparse.values.name = name
    return sparse


EXTERNAL_PLACES = ("sparse_initializer", "constant_sparse_value", "constantofshape_value", "subgraph_attribute",
                   "function_attribute", "absolute_path", "parent_path")


def external_data_model(place: str) -> onnx.ModelProto:
    """The tiny model plus an output ``leak`` whose values come from SECRET_NAME through a
    TensorProto that is neither an initializer nor a Constant's ``value``."""
    model = K.tiny_model()
    graph = model.graph
    leak_out = helper.make_tensor_value_info("leak", TensorProto.UINT8, None)
    graph.output.append(leak_out)
    shape = numpy_helper.from_array(np.array([SECRET_LENGTH], np.int64), "leak_shape")
    if place in ("sparse_initializer", "absolute_path", "parent_path"):
        location = {"sparse_initializer": SECRET_NAME, "absolute_path": "/etc/passwd", "parent_path": "../../../../etc/passwd"}[place]
        graph.sparse_initializer.append(_sparse_secret("S", location))
        graph.node.append(helper.make_node("Identity", ["S"], ["leak"]))
    elif place == "constant_sparse_value":
        graph.node.append(helper.make_node("Constant", [], ["leak"], sparse_value=_sparse_secret("C")))
    elif place == "constantofshape_value":
        graph.initializer.append(shape)
        graph.node.append(helper.make_node("ConstantOfShape", ["leak_shape"], ["leak"], value=_secret_values(1)))
    elif place == "subgraph_attribute":
        graph.initializer.append(shape)
        branch = helper.make_graph([helper.make_node("ConstantOfShape", ["leak_shape"], ["leaked"], value=_secret_values(1))],
                                   "branch", [], [helper.make_tensor_value_info("leaked", TensorProto.UINT8, None)])
        graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
        graph.node.append(helper.make_node("If", ["always"], ["leak"], then_branch=branch, else_branch=copy.deepcopy(branch)))
    elif place == "function_attribute":
        graph.initializer.append(shape)
        function = helper.make_function(
            "moub.hostile", "Leak", ["s"], ["out"],
            [helper.make_node("ConstantOfShape", ["s"], ["out"], value=_secret_values(1))],
            [helper.make_opsetid("", 17)],
        )
        model.functions.append(function)
        model.opset_import.append(helper.make_opsetid("moub.hostile", 1))
        graph.node.append(helper.make_node("Leak", ["leak_shape"], ["leak"], domain="moub.hostile"))
    else:
        raise ValueError(place)
    return model


def stored_stripped(model: onnx.ModelProto, stored: tuple[str, ...] = ("W", "B")) -> K.Blob:
    """The graph blob of ``model`` with the payloads of the ``stored`` initializers removed
    (the others keep theirs), zlib-compressed."""
    model = copy.deepcopy(model)
    for tensor in model.graph.initializer:
        if tensor.name in stored:
            K.clear_payload(tensor)
    data = model.SerializeToString(deterministic=True)
    return K.Blob(zlib.compress(data, 9), C.CODEC_ZLIB, decoded_length=len(data))


def external_data_file(place: str) -> bytes:
    """A valid-looking .moub whose graph is :func:`external_data_model`."""
    spec = K.valid_spec()
    spec.graph = stored_stripped(external_data_model(place))
    return K.build(spec)


def external_data_onnx(path: Path) -> Path:
    """The bundled digits model plus an output read from SECRET_NAME through a sparse
    initializer: the converter's input for the same hole."""
    model = onnx.load(Path(__file__).resolve().parent.parent / "converters" / "data" / "digits_cnn.onnx")
    model.graph.sparse_initializer.append(_sparse_secret("S"))
    model.graph.node.append(helper.make_node("Identity", ["S"], ["leak"]))
    model.graph.output.append(helper.make_tensor_value_info("leak", TensorProto.UINT8, None))
    onnx.save(model, path)
    return path


# ---------------------------------------------------------------- amplification


def _codebook_tables(data: bytes) -> list[int]:
    vector = K.follow(data, K.model_field(data, "codebooks"))
    count = int.from_bytes(data[vector : vector + 4], "little")
    return [K.follow(data, vector + 4 + 4 * i) for i in range(count)]


def shared_values_file(codebooks: int = 4096, entries: int = 1 << 20) -> bytes:
    """``codebooks`` codebooks whose ``values`` all point at one vector of ``entries`` floats
    (the report's 4.2 MB file: 4096 x 2^20). Each check per codebook passes."""
    spec = K.valid_spec()
    spec.codebooks = [K.CODEBOOK.copy()] + [np.zeros(entries, np.float32)] + [np.zeros(1, np.float32)] * (codebooks - 2)
    data = bytearray(K.build(spec))
    tables = _codebook_tables(bytes(data))
    target = K.follow(bytes(data), K.field_pos(bytes(data), tables[1], 0))   # codebook 1's values vector
    for table in tables[2:]:
        field = K.field_pos(bytes(data), table, 0)
        assert target > field, "flatbuffers places earlier vectors after later tables"
        data[field : field + 4] = (target - field).to_bytes(4, "little")
    return K.reseal(data)


def _sum_graph(names: list[str], dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y = x + sum of one-element initializers ``names`` (payloads stripped)."""
    inits = [helper.make_tensor(name, dtype, [1], [0.0]) for name in names]
    for tensor in inits:
        tensor.ClearField("float_data")
        tensor.ClearField("int32_data")
    graph = helper.make_graph([helper.make_node("Sum", ["x", *names], ["y"])], "many",
                              [helper.make_tensor_value_info("x", dtype, [1])], [helper.make_tensor_value_info("y", dtype, [1])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


DEEP_LENGTHS = np.array(list(range(1, C.MAX_CODE_LENGTH + 1)) + [C.MAX_CODE_LENGTH], dtype=np.uint8)  # Kraft sum 1, 21 codes


def _one_element_tensor(i: int, codebook: int, table: int) -> K.Tensor:
    # symbol 0 has the one-bit code "0": one element is one zero bit
    return K.Tensor(f"init:T{i:05d}", f"T{i:05d}", TensorProto.FLOAT, [1], C.ENCODING_HUFFMAN, K.Blob(b"\x00"), codebook, table, 1, [1])


def grid_tables_file(codebooks: int = 11, count: int = 1 << 24) -> bytes:
    """``codebooks`` grid codebooks of ``count`` values (12 index bytes each), each used by a
    one-element tensor, sharing one packed code-length table of ``count`` lengths (a few KB of
    DEFLATE): the reader materialises every grid at parse time."""
    huffman.validate_lengths(DEEP_LENGTHS)
    lengths = np.zeros(count, np.uint8)
    lengths[: DEEP_LENGTHS.size] = DEEP_LENGTHS
    names = [f"T{i:05d}" for i in range(codebooks)]
    return K.build(K.Spec(
        graph=K.stripped_graph(_sum_graph(names)),
        codebooks=[K.Grid(-(count // 2), count) for _ in range(codebooks)],
        tables=[K.packed_table(lengths)],
        tensors=[_one_element_tensor(i, i, 0) for i in range(codebooks)],
        metadata=[],
        required_features=C.FEATURE_PACKS | C.FEATURE_PACKED_TABLES,
    ))


def deep_tables_file(tensors: int = 300) -> bytes:
    """``tensors`` one-element tensors, each with a code-length table of its own whose longest
    code is MAX_CODE_LENGTH bits: a table-driven decoder builds 2^20 entries for each."""
    names = [f"T{i:05d}" for i in range(tensors)]
    return K.build(K.Spec(
        graph=K.stripped_graph(_sum_graph(names)),
        codebooks=[np.linspace(-1, 1, DEEP_LENGTHS.size, dtype=np.float32)],
        tables=[DEEP_LENGTHS.copy() for _ in range(tensors)],
        tensors=[_one_element_tensor(i, 0, i) for i in range(tensors)],
        metadata=[],
    ))


def _graph_with(tensor_name: str, dims: list[int], dtype: int = TensorProto.FLOAT) -> K.Blob:
    x = TensorProto(name=tensor_name, data_type=dtype, dims=dims)  # no payload: the file stores it
    graph = helper.make_graph([helper.make_node("Identity", [tensor_name], ["y"])], "one", [],
                              [helper.make_tensor_value_info("y", dtype, None)], [x])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return K.stripped_graph(model)


def raw_bomb_file(decoded_bytes: int = 1 << 36, stored_bytes: int = 1 << 24, right_checksum: bool = False) -> bytes:
    """One raw float tensor of ``decoded_bytes`` declared as zlib in ``stored_bytes`` of junk,
    its checksum wrong (the report's 16 MiB file declaring 64 GiB)."""
    junk = np.random.default_rng(3).bytes(stored_bytes)
    blob = K.Blob(junk, C.CODEC_ZLIB, decoded_length=decoded_bytes)
    if not right_checksum:
        blob.checksum = K.Checksum(digest=hashlib.sha256(b"not these bytes").digest())
    tensor = K.Tensor("init:X", "X", TensorProto.FLOAT, [decoded_bytes // 4], C.ENCODING_RAW, blob)
    return K.build(K.Spec(graph=_graph_with("X", [decoded_bytes // 4]), codebooks=[], tables=[], tensors=[tensor], metadata=[]))


def _xz(pieces, preset: int = 6) -> bytes:
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=preset)
    out = [compressor.compress(piece) for piece in pieces]
    out.append(compressor.flush())
    return b"".join(out)


def _zeros(total: int, piece: int = 1 << 24):
    block = bytes(piece)
    while total > 0:
        yield block[: min(piece, total)]
        total -= piece


def _incompressible_tail(decoded_bytes: int) -> bytes:
    """Random letters, 1/5000 of ``decoded_bytes``: xz compresses zeros further than the reader's
    4096x expansion cap, so a bomb at the cap needs some bytes that do not compress."""
    return bytes(np.random.default_rng(5).integers(97, 123, max(1, decoded_bytes // 5000), dtype=np.uint8))


def lzma_tensor_file(decoded_bytes: int = 1 << 30) -> bytes:
    """One raw tensor of ``decoded_bytes`` (zeros, then a few random letters) stored as xz (the
    report's 272 KB file decoding to a 1 GiB tensor): valid, only big."""
    tail = _incompressible_tail(decoded_bytes)
    stored = _xz([*_zeros(decoded_bytes - len(tail)), tail])
    tensor = K.Tensor("init:X", "X", TensorProto.FLOAT, [decoded_bytes // 4], C.ENCODING_RAW,
                      K.Blob(stored, C.CODEC_LZMA, decoded_length=decoded_bytes))
    return K.build(K.Spec(graph=_graph_with("X", [decoded_bytes // 4]), codebooks=[], tables=[], tensors=[tensor], metadata=[],
                          required_features=C.FEATURE_LZMA))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def lzma_graph_file(doc_bytes: int = (1 << 31) - (1 << 20)) -> bytes:
    """The tiny file whose graph carries a ``doc_string`` of ``doc_bytes`` zeros, stored as xz
    (the report's 533 KB file decoding to a 2 GiB graph). The xz stream is kept at or above
    1/4096 of the graph with a tail of random letters, so the expansion-ratio cap passes."""
    head = K.stripped_graph(codec=C.CODEC_NONE).payload + b"\x32" + _varint(doc_bytes)  # field 6 (doc_string), bytes
    decoded = len(head) + doc_bytes
    tail = _incompressible_tail(doc_bytes)
    pieces = [head, *_zeros(doc_bytes - len(tail)), tail]
    stored = _xz(pieces, preset=1)
    assert decoded <= len(stored) * C.DEFAULT_LIMITS.max_expansion_ratio, (decoded, len(stored))
    spec = K.valid_spec()
    spec.graph = K.Blob(stored, C.CODEC_LZMA, decoded_length=decoded)
    spec.required_features = C.FEATURE_LZMA
    return K.build(spec)


# ---------------------------------------------------------------- verify and load disagreed


def float16_overflow_file() -> bytes:
    """W is a float16 site whose codebook holds 70000 (finite in float32, inf in float16)."""
    model = K.tiny_model()
    weight = model.graph.initializer[0]
    weight.data_type = TensorProto.FLOAT16
    spec = K.valid_spec()
    spec.graph = K.stripped_graph(model)
    spec.codebooks = [K.CODEBOOK * np.float32(280000)]   # 0.25 x 280000 = 70000
    spec.tensors[1].dtype = TensorProto.FLOAT16
    return K.build(spec)


def wrong_payload_digest_file() -> bytes:
    spec = K.valid_spec()
    spec.payload_digest = K.Checksum(digest=hashlib.sha256(b"another payload").digest())
    return K.build(spec)


# ---------------------------------------------------------------- smaller ones


def terminal_control_file() -> bytes:
    """Producer, tensor name and metadata that set the terminal title, clear the screen and
    print a forged line."""
    spec = K.valid_spec()
    spec.producer = "moub 0.1.0\x1b]0;owned\x07\x1b[2J\x1b[H"
    spec.metadata = [("moub.purpose", "ok\r\nfile.moub: structure, checksums, graph and every tensor and pack decode: OK\x1b[8m")]
    return K.build(spec)


def negative_dims_file() -> bytes:
    """A graph initializer with dims [-1] and no data, which the file does not provide."""
    model = K.tiny_model()
    model.graph.initializer.append(TensorProto(name="N", data_type=TensorProto.FLOAT, dims=[-1]))
    spec = K.valid_spec()
    spec.graph = stored_stripped(model)
    return K.build(spec)


def shadowed_weight_file() -> bytes:
    """The stored W, and a second initializer W with other values inline after it."""
    shadow = numpy_helper.from_array(np.full((K.N_IN, K.N_OUT), 1000.0, np.float32), "W")
    spec = K.valid_spec()
    stripped = onnx.ModelProto()
    stripped.ParseFromString(zlib.decompress(spec.graph.payload))
    stripped.graph.initializer.append(shadow)
    spec.graph = K.Blob(stripped.SerializeToString())
    return K.build(spec)


def constant_shadow_file() -> bytes:
    """The stored W, and a Constant node before the MatMul that also outputs W (values 1000)."""
    model = K.tiny_model()
    shadow = numpy_helper.from_array(np.full((K.N_IN, K.N_OUT), 1000.0, np.float32), "W")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value=shadow))
    spec = K.valid_spec()
    spec.graph = stored_stripped(model)
    return K.build(spec)


def weight_versions(size: int = 32) -> tuple[bytes, bytes]:
    """Two valid files of one model, x[1, size] -> MatMul W -> Add B, whose W (Huffman) and B
    (raw) are big enough (4 KiB each at 32) to go to a data file when decoded with a low
    threshold; the second file's codebook is the first's doubled."""
    rng = np.random.default_rng(11)
    lengths = np.array([3, 2, 1, 4, 4], dtype=np.uint8)
    indices = rng.integers(0, K.CODEBOOK.size, size * size)
    bias = rng.standard_normal((size, size)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])], "versions",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        [TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[size, size]),
         TensorProto(name="B", data_type=TensorProto.FLOAT, dims=[size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    files = []
    for scale in (1, 2):
        model.doc_string = f"v{scale}"  # the model file says which version it is; its data file may not agree
        files.append(K.build(K.Spec(
            graph=K.stripped_graph(model),
            codebooks=[K.CODEBOOK * np.float32(scale)],
            tables=[lengths],
            tensors=[K.raw_tensor(bias, "init:B", "B"), K.huffman_tensor(indices, lengths, dims=[size, size])],
            metadata=[],
        )))
    return files[0], files[1]


def old_version_with_new_features_file() -> bytes:
    """Labelled 1.0 (no index digest needed) while setting the 1.2 packs bit: the index is
    unprotected, and the feature bit says it needs a reader that checks it."""
    spec = K.valid_pack_spec()
    spec.format_minor = 0
    spec.index_digest = None
    return K.build(spec)


# ---------------------------------------------------------------- converter data


def npz_zip_bomb(path: Path, samples: int, shape: tuple[int, ...] = (1, 8, 8)) -> Path:
    """An .npz whose ``input`` array of ``samples`` zero images is deflated to a few MB
    (the report's 2.1 MB file expanding to 2 GiB: 8.4 M digit images), written piece by piece."""
    array_header = {"descr": "<f4", "fortran_order": False, "shape": (samples, *shape)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("input.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, array_header)
            total = samples * int(np.prod(shape)) * 4
            for piece in _zeros(total):
                member.write(piece)
    return path


def npz_header_claims(path: Path, shape: tuple[int, ...] = (1 << 40,), descr: str = "|u1") -> Path:
    """A few hundred bytes of .npz whose one member's .npy header declares ``shape`` (4 TiB
    of uint8 by default) and holds no data."""
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("input.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)
    return path
