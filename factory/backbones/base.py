"""The one interface every backbone family implements.

A backbone is a frozen CLIP-family pair (text + image encoder) plus, optionally, a diffusion generator
conditioned on the same text encoder. Families differ only in how their text transformer runs on
*embeddings* (so vectors can be injected) and how images are encoded; the rest lives here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.backbones.config import BackboneConfig
from factory.backbones.generator import DiffusionGenerator
from factory.errors import DimensionMismatch, UnknownConceptMarker
from factory.tokens.injection import inject
from factory.tokens.tokenizer import PromptBatch, PromptTokenizer


@dataclass
class TextEncoding:
    features: torch.Tensor  # [B, D] pooled at end-of-text and projected to CLIP space (not normalised)
    hidden: torch.Tensor  # [B, L, w] final-layer-normed states: the diffusion conditioning


class Backbone(nn.Module):
    """Base class; see `HFClipBackbone` and `OpenClipBackbone`."""

    def __init__(self, config: BackboneConfig, generator: DiffusionGenerator | None = None):
        super().__init__()
        self.config = config
        tc = config.tokenizer
        self.tokenizer = PromptTokenizer(tc.context_length, tc.pad, tc.keep_ids)
        if generator is None and config.generator:
            generator = DiffusionGenerator(config.generator)
        self.generator: DiffusionGenerator | None = generator
        self._fingerprint: str | None = None

    # ---- family-specific -------------------------------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def text_transformer(self, embeddings: torch.Tensor, eot: torch.Tensor) -> TextEncoding:
        """Run the text transformer on token *embeddings* [B, L, w] (position embeddings not yet added)."""
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        raise NotImplementedError

    def image_tower(self) -> list[nn.Module]:
        """The modules that map pixels to image features (what a vision-only pretraining step trains)."""
        raise NotImplementedError

    def to_training_device(self, device: str | torch.device) -> "Backbone":
        """Move only what learning runs through (text tower, UNet) to ``device``.

        Image features and latents are computed once before learning, so the image tower and the VAE stay
        where they are: on a GPU that is the difference between ViT-L/14 + VAE in memory or not.
        """
        stay = [*self.image_tower(), *([self.generator.vae] if self.generator and self.generator.vae else [])]
        skip = {id(m) for s in stay for m in s.modules()}
        for mod in self.modules():
            if id(mod) in skip:
                continue
            for k, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[k] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.to(device)
        return self

    # ---- shared ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def token_dim(self) -> int:
        """Width of the input word embeddings: the size of a learned token."""
        return self.token_embedding.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def tokenize(self, prompts: Sequence[str] | str) -> PromptBatch:
        return self.tokenizer(list(prompts) if not isinstance(prompts, str) else prompts)

    def encode_text(self, batch: PromptBatch, vectors: torch.Tensor | None = None) -> TextEncoding:
        """Encode tokenised prompts, injecting ``vectors`` [len(batch.concept_ids), d] at the markers."""
        batch = batch.to(self.device)
        emb = self.token_embedding(batch.input_ids)
        emb = inject(emb, batch, vectors.to(self.device) if vectors is not None else None)
        return self.text_transformer(emb, batch.eot_positions)

    def encode_prompts(
        self, prompts: Sequence[str] | str, tokens: Mapping[str, torch.Tensor] | None = None
    ) -> TextEncoding:
        """Tokenise and encode; ``tokens`` maps concept id -> vector for every marker in the prompts."""
        batch = self.tokenize(prompts)
        return self.encode_text(batch, self.lookup(batch.concept_ids, tokens or {}))

    def lookup(self, concept_ids: Sequence[str], tokens: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if not concept_ids:
            return None
        missing = [c for c in concept_ids if c not in tokens]
        if missing:
            raise UnknownConceptMarker(missing, known=len(tokens))
        vecs = [torch.as_tensor(tokens[c], dtype=torch.float32).reshape(-1) for c in concept_ids]
        for c, v in zip(concept_ids, vecs):
            if v.shape[0] != self.token_dim:
                raise DimensionMismatch(
                    f"token {c!r} has dimension {v.shape[0]}, but backbone {self.name!r} needs {self.token_dim}: "
                    "it was learned for another backbone"
                )
        return torch.stack(vecs)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [N, 3, S, S] -> image features [N, D] (not normalised)."""
        p = next(self.image_tower()[0].parameters())  # the image tower may sit apart (`to_training_device`)
        return self.image_features(pixels.to(p.device, p.dtype))

    def preprocess(self, images) -> torch.Tensor:
        """PIL images or uint8 arrays [N, H, W, 3] -> normalised float pixels at the configured size."""
        x = _to_float_nchw(images)
        size = self.config.image.size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mean, std = self._normalisation(x.device, x.dtype)
        return (x - mean) / std

    def _normalisation(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The image mean/std [1, 3, 1, 1] on ``device``, copied there once: a uint8 batch sent to the GPU
        is converted and resized there, and a copy per call would make the host wait every batch."""
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_norm_cache", {})
        if key not in cache:
            c = self.config.image
            cache[key] = tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device) for v in (c.mean, c.std))
        return cache[key]

    def generator_pixels(self, images) -> torch.Tensor:
        """Images -> [-1, 1] pixels at the generator's resolution (the input of `DiffusionGenerator.encode`)."""
        if self.generator is None:
            raise ValueError(f"backbone {self.name!r} has no generator")
        x = _to_float_nchw(images)
        size = self.generator.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return x * 2 - 1

    def word_embedding(self, word: str) -> torch.Tensor:
        """Input embedding of a word: the mean of its BPE pieces' rows."""
        ids = torch.tensor(self.tokenizer.word_ids(word), device=self.device)
        return self.token_embedding(ids).float().mean(0)

    @property
    def vocab_mean_norm(self) -> float:
        """Mean L2 norm of the word-embedding rows: the yardstick for a learned token's norm."""
        return float(self.token_embedding.weight.float().norm(dim=1).mean())

    def fingerprint(self) -> str:
        """sha256 of the weights (state dict bytes), computed once; identifies tokens' compatibility.

        `load_backbone` computes it before any cast (tokens learned in bf16 serve in fp32 and back), and
        loading from a file sets it from the file's bytes. Computed later, on a cast model, it hashes the
        fp32 values of the cast weights (NumPy has no bf16), so it still names the weights it sees.
        """
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
            for k, v in sorted(self.state_dict().items()):
                v = v.detach()
                if v.dtype in (torch.bfloat16, torch.float16):
                    v = v.float()
                h.update(k.encode())
                h.update(v.cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def cast_precision(self, dtype: torch.dtype) -> "Backbone":
        """Cast the image tower and the generator (UNet, VAE) to ``dtype``; the text tower stays fp32.

        Why the text tower stays fp32 (as diffusers' textual-inversion example keeps it): a token is
        injected into it and its CE logits decide early stopping and λ_TI; in bf16 they carried ±0.005 mean
        (0.019 max) of rounding on fashion-mini at logit scale 22.5, far above ``min_delta``, and CLIP-L
        runs at scale 100. It is about 3 % of a learning step's FLOPs. The UNet, where the FLOPs are, takes
        the fp32 hidden states through ``cond.to(unet.dtype)``.
        """
        if dtype == torch.float32:
            return self.float()
        low = [*self.image_tower(), *([self.generator] if self.generator is not None else [])]
        for m in low:
            m.to(dtype)
        return self

    def word_embeddings_cpu(self) -> Callable[[str], torch.Tensor]:
        """``word -> [d]`` fp32 embeddings on the CPU from one host copy of the table: what subspaces are
        built from, so a basis is the same on every device (one copy instead of one per word on a GPU)."""
        table = self.token_embedding.weight.detach().float().cpu()

        def embed(word: str) -> torch.Tensor:
            return table[torch.tensor(self.tokenizer.word_ids(word))].mean(0)

        return embed

    def freeze(self) -> "Backbone":
        """Eval mode, no gradients anywhere: only injected token vectors may require grad."""
        self.eval()
        self.requires_grad_(False)
        return self


def _to_float_nchw(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        # uint8 tensors are [N, H, W, 3] in 0..255; float tensors are [N, 3, H, W] in [0, 1].
        if images.dtype == torch.uint8:
            return images.permute(0, 3, 1, 2).float() / 255.0
        return images.float()
    if isinstance(images, np.ndarray):
        arr = images
    else:  # a sequence of PIL images (possibly of different sizes): bring each to RGB arrays
        arrs = [np.asarray(im.convert("RGB")) for im in images]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError("images of different sizes: resize them to one size before batching")
        arr = np.stack(arrs)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {arr.shape}")
    return torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(0, 3, 1, 2).float() / 255.0
