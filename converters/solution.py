"""A candidate compression of the pool, and its encoded size computed from counts.

Every mode (``paper`` and later ones) describes a candidate the same way: one
or more codebooks, one index per pooled weight into its site's codebook, and
optionally per-site Huffman tables. The size is what the container will spend
on the quantized weights, computed from the index counts without encoding:
Huffman payload bits (canonical, length-limited, exactly as the writer builds
the tables) plus 32 bits per codebook entry and 8 bits per code-length entry,
as ``moub inspect`` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moub_format import dtypes, huffman, writer

from .encode import TensorAssignment
from .intake import Pool

CODEBOOK_ENTRY_BITS = 32  # float32 values
TABLE_ENTRY_BITS = 8      # one code length (ubyte) per codebook entry


@dataclass(frozen=True)
class Quantization:
    """Codebooks plus one index per pooled weight.

    ``site_codebook[i]`` is the codebook of pool site ``i`` (all 0 when None);
    ``site_table[i]`` the Huffman table it is coded with (None: the shared
    table of its codebook, built by the writer from all its indices); ``tables``
    are explicit per-site tables (code lengths), indexed after the shared ones.
    """

    codebooks: tuple[np.ndarray, ...]
    indices: np.ndarray
    site_codebook: tuple[int, ...] | None = None
    site_table: tuple[int | None, ...] | None = None
    tables: tuple[np.ndarray, ...] = ()

    def codebook_of(self, site_number: int) -> int:
        return 0 if self.site_codebook is None else self.site_codebook[site_number]

    def bins_used(self) -> int:
        return int(sum(cb.size for cb in self.codebooks))

    def pool_values(self, pool: Pool) -> np.ndarray:
        """Dequantized float32 value of every pooled weight (before the dtype cast)."""
        if self.site_codebook is None:
            return np.asarray(self.codebooks[0], dtype=np.float32)[self.indices]
        out = np.empty(pool.n_weights, dtype=np.float32)
        for i, site in enumerate(pool.sites):
            out[site.start : site.stop] = self.codebooks[self.codebook_of(i)][self.indices[site.start : site.stop]]
        return out

    def site_arrays(self, pool: Pool) -> dict[str, np.ndarray]:
        """Each pooled site's quantized tensor in its storage dtype and shape (what decode gives)."""
        values = self.pool_values(pool)
        return {
            site.path: dtypes.cast_from_float32(values[site.start : site.stop], site.dtype).reshape(site.dims)
            for site in pool.sites
        }

    def assignments(self, pool: Pool) -> dict[str, TensorAssignment]:
        """Each site's codebook and indices: views of ``indices`` (no copy; the writer
        takes any integer dtype)."""
        return {
            site.path: TensorAssignment(self.codebook_of(i), self.indices[site.start : site.stop])
            for i, site in enumerate(pool.sites)
        }


@dataclass(frozen=True)
class Size:
    """Encoded size of the quantized weights, in bits."""

    index_bits: int
    codebook_bits: int
    table_bits: int
    n_weights: int

    @property
    def total_bits(self) -> int:
        return self.index_bits + self.codebook_bits + self.table_bits

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.n_weights if self.n_weights else 0.0

    def to_dict(self) -> dict:
        return {
            "index_bits": self.index_bits,
            "codebook_bits": self.codebook_bits,
            "table_bits": self.table_bits,
            "bits_per_weight": round(self.bits_per_weight, 6),
        }


CHUNK_ENTRY_BITS = 64   # each chunk's exact bit length, stored in the index
CHUNK_PADDING_BITS = 4  # each chunk ends on a byte boundary: 0..7 padding bits, 4 on average


def chunk_overhead_bits(pool: Pool) -> int:
    """What the writer's chunking costs (as ``moub inspect`` counts it): the same for every candidate."""
    chunk = writer.default_chunk_elements(pool.n_weights)
    return (CHUNK_ENTRY_BITS + CHUNK_PADDING_BITS) * sum(math.ceil(site.size / chunk) for site in pool.sites)


def table_lengths(counts: np.ndarray) -> np.ndarray:
    """The code lengths the writer builds for a shared table with these counts."""
    return huffman.code_lengths(counts, huffman.writer_max_length(int(np.count_nonzero(counts))))


def huffman_size(q: Quantization, pool: Pool) -> Size:
    """Bits of the Huffman-coded indices (shared table per codebook, or per-site tables)."""
    shared_counts = [np.zeros(cb.size, dtype=np.int64) for cb in q.codebooks]
    index_bits = 0
    explicit_tables_used: set[int] = set()
    for i, site in enumerate(pool.sites):
        counts = np.bincount(q.indices[site.start : site.stop], minlength=q.codebooks[q.codebook_of(i)].size)
        table = None if q.site_table is None else q.site_table[i]
        if table is None:
            shared_counts[q.codebook_of(i)] += counts
        else:
            explicit_tables_used.add(table)
            index_bits += huffman.encoded_bits(counts, q.tables[table - len(q.codebooks)])
    table_bits = 0
    for counts in shared_counts:
        if counts.any():
            index_bits += huffman.encoded_bits(counts, table_lengths(counts))
        table_bits += TABLE_ENTRY_BITS * counts.size
    table_bits += sum(TABLE_ENTRY_BITS * q.tables[t - len(q.codebooks)].size for t in explicit_tables_used)
    codebook_bits = CODEBOOK_ENTRY_BITS * q.bins_used()
    return Size(index_bits + chunk_overhead_bits(pool), codebook_bits, table_bits, pool.n_weights)


def counts_size(counts: np.ndarray, n_weights: int, chunk_bits: int = 0) -> Size:
    """Huffman size of one shared codebook from its bin counts alone (the search objective)."""
    lengths = table_lengths(counts)
    return Size(
        huffman.encoded_bits(counts, lengths) + chunk_bits,
        CODEBOOK_ENTRY_BITS * int(counts.size),
        TABLE_ENTRY_BITS * int(counts.size),
        n_weights,
    )


def fixed_length_size(entries: Sequence[int], n_weights: int) -> Size:
    """Bits with fixed-length indices: ceil(log2 entries) per weight, no table (binning stage)."""
    width = max(1, math.ceil(math.log2(max(entries)))) if entries else 0
    return Size(width * n_weights, CODEBOOK_ENTRY_BITS * int(sum(entries)), 0, n_weights)
