"""The lossless file: every tensor stored exactly, so a conversion is never worse than no conversion.

When no candidate stays within ``--max-drop`` (a model whose outputs move past the tolerance at
any step the search can take), the converter still writes a file: the model's own bytes in the
container, each tensor byte for byte with the smallest of the container's codecs (none, zlib,
LZMA) and the graph LZMA-compressed. It decodes to the original's exact bits, so its quality is
the original's. The same file replaces a lossy choice that came out larger than it, so the default
is never larger than a general-purpose lossless compressor of the .onnx (LZMA per tensor is within
a few percent of ``zstd -19`` on float weights, and smaller on the bench's models).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from moub_format import constants as C
from moub_format import writer

from .encode import encode_model

BUILD_OPTIONS = {"graph_codec": C.CODEC_LZMA, "raw_codec": writer.SMALLEST, "alignment": 8,
                 "elide_constant_names": True}
# Float weights compress losslessly by about 1.1x (2.1x where a model holds many tiny or repeated
# values): a lossy file smaller than this share of the original cannot lose to the lossless one,
# and the lossless file (LZMA over the whole model) is not worth building beside it.
WORTH_COMPARING = 1 / 4


class _NoBins:
    """What the report asks of a quantization, for a file with none."""

    @staticmethod
    def bins_used() -> int:
        return 0


NO_BINS = _NoBins()


def lossless_bytes(model: onnx.ModelProto, metadata: Mapping[str, str]) -> bytes:
    """The .moub bytes of ``model`` with no tensor quantized."""
    return encode_model(model, (), {}, metadata, **BUILD_OPTIONS)


def worth_comparing(lossy_bytes: int, original_bytes: int) -> bool:
    """Whether a lossy file of ``lossy_bytes`` could be larger than the lossless one."""
    return lossy_bytes > original_bytes * WORTH_COMPARING


__all__ = ["BUILD_OPTIONS", "NO_BINS", "lossless_bytes", "worth_comparing"]
