"""A tiny WD14-format tagger built in code: `model.onnx` and `selected_tags.csv` in a folder, no hub, no onnx package.

It keeps the real taggers' contract: input `[batch, 448, 448, 3]` float32 BGR 0-255, one sigmoid output per row of
selected_tags.csv (4 ratings first, then general and character tags). Its scores come from the mean colour of
the padded image: a red picture gets `red_theme`, a green one the character `hatsune_miku_(vocaloid)`, a light
one `white_background`; `1girl` and `solo` are near-certain, `long_hair` unlikely. The tests and `bench caption`
run it through onnxruntime as they would a downloaded tagger.

The ONNX file is written straight in protobuf's wire format (the `onnx` package needs a newer protobuf than the
WebUI's 3.20): ReduceMean over width then height, MatMul, Add, Sigmoid, at opset 13.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from lora_train.tagger import CHARACTER, GENERAL, MODEL_FILE, RATING, TAGS_FILE

IMAGE_SIZE = 448
OPSET, IR_VERSION = 13, 7
FLOAT, ATTRIBUTE_INTS = 1, 7  # TensorProto.FLOAT, AttributeProto.INTS
# (tag, category, weight on the mean blue, green, red in 0..1, bias): score = sigmoid(weights . mean + bias)
TINY_TAGS: Tuple[Tuple[str, int, Tuple[float, float, float], float], ...] = (
    ("general", RATING, (0.0, 0.0, 0.0), 2.0),
    ("sensitive", RATING, (0.0, 0.0, 0.0), 0.0),
    ("questionable", RATING, (0.0, 0.0, 0.0), -1.0),
    ("explicit", RATING, (0.0, 0.0, 0.0), -2.0),
    ("1girl", GENERAL, (0.0, 0.0, 0.0), 4.0),
    ("solo", GENERAL, (0.0, 0.0, 0.0), 2.0),
    ("red_theme", GENERAL, (-6.0, -6.0, 12.0), -3.0),
    ("blue_theme", GENERAL, (12.0, -6.0, -6.0), -3.0),
    ("white_background", GENERAL, (5.0, 5.0, 5.0), -12.0),
    ("long_hair", GENERAL, (0.0, 0.0, 0.0), -1.5),
    ("^_^", GENERAL, (0.0, 0.0, 0.0), 0.5),
    ("hatsune_miku_(vocaloid)", CHARACTER, (-6.0, 12.0, -6.0), -3.0),
    ("hakurei_reimu", CHARACTER, (-4.0, -4.0, 8.0), -4.0),
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9) little-endian float32."""
    dims = b"".join(_int(1, size) for size in array.shape)
    return dims + _int(2, FLOAT) + _str(8, name) + _bytes(9, np.ascontiguousarray(array, "<f4").tobytes())


def _value_info(name: str, shape: Sequence[object]) -> bytes:
    """ValueInfoProto of a float tensor; an int dimension is fixed, a str one named (dynamic)."""
    dims = b"".join(_bytes(1, _int(1, size) if isinstance(size, int) else _str(2, str(size))) for size in shape)
    tensor_type = _int(1, FLOAT) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op_type: str, inputs: List[str], outputs: List[str], *attributes: bytes) -> bytes:
    return (b"".join(_str(1, name) for name in inputs) + b"".join(_str(2, name) for name in outputs)
            + _str(3, outputs[0]) + _str(4, op_type) + b"".join(_bytes(5, attribute) for attribute in attributes))


def _ints_attribute(name: str, values: Sequence[int]) -> bytes:
    return _str(1, name) + b"".join(_int(8, value) for value in values) + _int(20, ATTRIBUTE_INTS)


def tagger_onnx(weights: np.ndarray, bias: np.ndarray, image_size: int = IMAGE_SIZE) -> bytes:
    """The serialized ModelProto: sigmoid(mean over H, W of the NHWC input @ weights + bias), [batch, tags]."""
    keep_no_dims = _str(1, "keepdims") + _int(3, 0) + _int(20, 2)  # AttributeProto.INT 0
    # two means of 448 values each: one of 448 x 448 in float32 rounds differently per batch size
    nodes = [_node("ReduceMean", ["input"], ["row_mean"], _ints_attribute("axes", (2,)), keep_no_dims),
             _node("ReduceMean", ["row_mean"], ["mean"], _ints_attribute("axes", (1,)), keep_no_dims),
             _node("MatMul", ["mean", "weights"], ["logits"]),
             _node("Add", ["logits", "bias"], ["shifted"]),
             _node("Sigmoid", ["shifted"], ["output"])]
    graph = (b"".join(_bytes(1, node) for node in nodes) + _str(2, "tiny_wd14_tagger")
             + _bytes(5, _tensor("weights", weights)) + _bytes(5, _tensor("bias", bias))
             + _bytes(11, _value_info("input", ("batch", image_size, image_size, 3)))
             + _bytes(12, _value_info("output", ("batch", len(bias)))))
    opset = _str(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _str(2, "lora_train.tiny_tagger") + _bytes(7, graph) + _bytes(8, opset)


def tiny_weights() -> Tuple[np.ndarray, np.ndarray]:
    """(weights [3, tags] on the 0-255 BGR mean, bias [tags]) of TINY_TAGS."""
    weights = np.array([tag[2] for tag in TINY_TAGS], dtype=np.float32).T / 255.0
    return weights, np.array([tag[3] for tag in TINY_TAGS], dtype=np.float32)


def build_tiny_tagger(folder: Path, image_size: int = IMAGE_SIZE) -> Path:
    """Writes model.onnx and selected_tags.csv of the tiny tagger to folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(tagger_onnx(*tiny_weights(), image_size=image_size))
    rows = [f"{index + 100},{name},{category},{1000 - index}" for index, (name, category, _, _) in enumerate(TINY_TAGS)]
    (folder / TAGS_FILE).write_text("tag_id,name,category,count\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return folder

