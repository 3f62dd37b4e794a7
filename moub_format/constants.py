"""Every magic number, version, limit and enum of the .moub format, in one place.

FORMAT.md is the normative spec; this module is its executable mirror. The enum
values are the ones in schema/moub.fbs and must never be renumbered.
"""

from __future__ import annotations

from dataclasses import dataclass

FILE_IDENTIFIER = b"MOUB"
FILE_EXTENSION = ".moub"

# Versioning: a reader accepts any file whose major equals FORMAT_MAJOR, whatever
# its minor, provided every bit of required_features is one it knows.
FORMAT_MAJOR = 1
FORMAT_MINOR = 4             # 1.1 Model.index_digest; 1.2 packs, grid codebooks, LZMA, packed tables; 1.3 compact packs;
                             # 1.4 integer Huffman tensors

# Required-feature bits (Model.required_features). A writer sets a bit when the
# file uses the feature; a reader rejects every bit it does not implement, so a
# 1.1 reader refuses a 1.2 file that needs one with a clear "requires features" error.
FEATURE_PACKS = 1 << 0       # Model.packs or a grid codebook (Codebook.count > 0)
FEATURE_LZMA = 1 << 1        # a blob with codec LZMA
FEATURE_PACKED_TABLES = 1 << 2  # a HuffmanTable with packed_lengths (a DEFLATE stream) instead of code_lengths
FEATURE_COMPACT_PACKS = 1 << 3  # a Pack with counts32, chunk_bits32 and offsets32 instead of the 64-bit vectors
FEATURE_CONSTANT_NAMES = 1 << 4  # the graph's Constant tensors named like their node's output are stored unnamed
FEATURE_INTEGER_TENSORS = 1 << 5  # a HUFFMAN tensor of an integer element type (its codebook holds its integers)
FEATURES = {
    FEATURE_PACKS: "packs and grid codebooks",
    FEATURE_LZMA: "LZMA blobs",
    FEATURE_PACKED_TABLES: "packed code-length tables",
    FEATURE_COMPACT_PACKS: "compact (32-bit) pack vectors",
    FEATURE_CONSTANT_NAMES: "Constant tensor names left out of the graph",
    FEATURE_INTEGER_TENSORS: "integer Huffman tensors",
}
FEATURE_SINCE_MINOR = {     # the format minor version that defined each bit; a file of an older minor must not set it
    FEATURE_PACKS: 2,
    FEATURE_LZMA: 2,
    FEATURE_PACKED_TABLES: 2,
    FEATURE_COMPACT_PACKS: 3,
    FEATURE_CONSTANT_NAMES: 3,
    FEATURE_INTEGER_TENSORS: 4,
}
KNOWN_REQUIRED_FEATURES = (FEATURE_PACKS | FEATURE_LZMA | FEATURE_PACKED_TABLES | FEATURE_COMPACT_PACKS
                           | FEATURE_CONSTANT_NAMES | FEATURE_INTEGER_TENSORS)  # bit mask of the flags this reader implements

# Layout
PREAMBLE_SIZE = 8            # FlatBuffers root uoffset (4) + file identifier (4)
DEFAULT_ALIGNMENT = 64       # payload blobs start on multiples of this
MAX_ALIGNMENT = 65536

# Huffman
MAX_CODE_LENGTH = 20         # length limit of canonical codes; bounds the decode table to 2^20 entries
WRITER_CODE_LENGTH = 15      # writers' own limit when the alphabet allows (decode table fits L2, 3 codes per window)
DEFAULT_CHUNK_ELEMENTS = 4096  # largest chunk writers choose by default (elements per independently decodable chunk)
MIN_DEFAULT_CHUNK_ELEMENTS = 512  # smallest: each chunk costs 64 bits of chunk_bits + ~4 bits of padding
DECODER_LANES = 1024         # chunks the lane decoder wants per batch; small models get smaller chunks

# Packed code-length tables (1.2): HuffmanTable.packed_lengths is one raw DEFLATE stream
# (RFC 1951, zlib wbits -15: no header, no Adler-32; the index digest covers the bytes).
TABLE_DEFLATE_WBITS = -15
TABLE_DEFLATE_LEVEL = 9      # writers: zlib level 9, default strategy, memLevel 9
TABLE_DEFLATE_MEMLEVEL = 9
PACKED_TABLE_OVERHEAD = 4    # writers pack a table only when packed bytes + this (the count field) < its entries

# Enums (mirror schema/moub.fbs)
ENCODING_HUFFMAN = 1         # codebook indices, canonical Huffman, chunked
ENCODING_RAW = 2             # raw little-endian bytes of a pass-through tensor
ENCODINGS = {ENCODING_HUFFMAN: "huffman", ENCODING_RAW: "raw"}

CODEC_NONE = 0               # bytes stored as they are
CODEC_ZLIB = 1               # zlib stream (stdlib; bounded inflate on read)
CODEC_LZMA = 2               # .xz stream (stdlib lzma; bounded output, memory-limited decoder)
CODECS = {CODEC_NONE: "none", CODEC_ZLIB: "zlib", CODEC_LZMA: "lzma"}

# LZMA (writers): preset 9 | PRESET_EXTREME, no integrity check (the blob has a
# SHA-256), and a dictionary no larger than the input needs, so a device decodes
# with little memory: the next power of two >= the input, in [4 KiB, 8 MiB].
LZMA_MIN_DICT = 1 << 12
LZMA_MAX_DICT = 1 << 23

# Grid codebooks: values first .. first + count - 1, exact in float32.
GRID_LIMIT = 1 << 24         # |first| and |first + count - 1| must be below this, and so must every pack
                             # member's levels |first + offset| and |first + count - 1 + offset|

CHECKSUM_SHA256 = 1
CHECKSUMS = {CHECKSUM_SHA256: ("sha256", 32)}


@dataclass(frozen=True)
class ReaderLimits:
    """Caps a reader enforces before allocating anything. All configurable."""

    max_file_bytes: int = 1 << 40
    max_index_bytes: int = 1 << 30
    max_tensors: int = 1 << 20
    max_codebooks: int = 4096
    max_codebook_entries: int = 1 << 24
    max_tables: int = 1 << 20
    max_chunks_per_tensor: int = 1 << 24
    max_chunk_elements: int = 1 << 24
    max_rank: int = 8
    max_tensor_elements: int = 1 << 34
    max_decoded_bytes: int = 1 << 36          # whole model, all tensors decoded
    max_expansion_ratio: int = 4096           # decoded bytes / stored bytes of one tensor
    max_graph_bytes: int = 1 << 31            # protobuf's own hard ceiling is 2 GiB
    max_metadata_entries: int = 1024
    max_metadata_key_bytes: int = 256
    max_metadata_value_bytes: int = 1 << 20
    max_string_bytes: int = 1 << 20           # any string: names, paths, metadata values
    max_flatbuffer_tables: int = 1 << 22
    max_flatbuffer_depth: int = 8
    max_packs: int = 1 << 20                  # packs per file
    max_pack_members: int = 1 << 20           # members of one pack
    max_lzma_memory: int = 1 << 25            # the xz decoder's memlimit (writers' dictionaries are at most 8 MiB)
    max_table_entries: int = 1 << 26          # code lengths of all Huffman tables together (packed ones inflated)
    # Bytes reading one file may materialise: index objects, code tables, the decoded model, the
    # graph and working memory, all counted before they are created (moub_format.budget).
    # None: derived from the machine when a file is opened (budget.default_memory_budget).
    memory_budget: int | None = None


DEFAULT_LIMITS = ReaderLimits()
