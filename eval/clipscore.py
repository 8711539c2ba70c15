"""CLIPScore of generated images against their prompts, globally and per LoRA region.

score = scale * max(cos(image embedding, text embedding), 0), with scale 100 (torchmetrics'
convention, the default) or 2.5 (Hessel et al.'s original CLIPScore). Models: open_clip
(an architecture name with a local checkpoint file or a pretrained tag, or a folder holding
open_clip_config.json and weights) and transformers CLIPModel folders (e.g. the toy-world CLIP).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from compose.regions import Box, box_pixels
from compose.spec import ResolvedLora

from .errors import ClipModelError

CONVENTIONS = {"torchmetrics": 100.0, "jmhessel": 2.5}


def default_clip() -> Path | None:
    """The toy-world CLIP folder when it is installed, else None (then a CLIP must be given)."""
    try:
        from toyworld import default_clip_path
    except ImportError:
        return None
    path = Path(default_clip_path())
    return path if (path / "config.json").is_file() else None


class CLIPScorer:
    """Scores images against texts with one CLIP model, in batches; one score per image.

    model: an open_clip architecture name ("ViT-B-32"), a folder with open_clip_config.json and
    weights, or a transformers CLIPModel folder; None takes the toy-world CLIP when installed;
    "tiny" is a random tiny CLIP built in code (for tests and trying the harness: meaningless scores).
    pretrained: with an architecture name, a local .safetensors checkpoint or a pretrained tag
    ("openai"; needs a reachable hub).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        pretrained: str | Path | None = None,
        *,
        convention: str = "torchmetrics",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        if convention not in CONVENTIONS:
            raise ClipModelError(f"unknown CLIPScore convention '{convention}'; choose one of {sorted(CONVENTIONS)}")
        if model is None:
            model = default_clip()
            if model is None:
                raise ClipModelError(
                    "no CLIP model given and the toy-world CLIP is not installed; pass a transformers CLIPModel "
                    "folder, an open_clip folder, or an open_clip architecture with pretrained=<file or tag>"
                )
        self.scale = CONVENTIONS[convention]
        self.convention = convention
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = str(model) if pretrained is None else f"{model}:{pretrained}"
        self._backend = _load_backend(str(model), None if pretrained is None else str(pretrained), self.device)

    @property
    def context_length(self) -> int:
        return self._backend.context_length

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """One score per (image, text) pair."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts; pass one text per image")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            image_batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            text_batch = list(texts[start : start + self.batch_size])
            for text in text_batch:
                self._warn_if_truncated(text)
            image_features = self._backend.encode_images(image_batch)
            text_features = self._backend.encode_texts(text_batch)
            scores.extend(clip_scores(image_features, text_features, self.scale).tolist())
        return scores

    def score_composition(self, image: Image.Image, prompt: str, loras: Sequence[ResolvedLora]) -> dict:
        """The global score of the whole image, and one score per LoRA that has a region.

        Trigger words mean nothing to CLIP, so every text is scored with each trigger replaced by
        its concept word; a region is cropped and scored against the LoRA's regional prompt (its
        concept word alone when it has none).
        """
        global_text = with_concepts(prompt, loras)
        images, texts, names = [image], [global_text], []
        for lora in loras:
            box = region_box(lora.region)
            if box is None:
                continue
            top, left, bottom, right = box_pixels(box, image.height, image.width)
            images.append(image.crop((left, top, right, bottom)))
            texts.append(with_concepts(lora.spec.prompt or lora.concept or lora.trigger or lora.adapter, loras))
            names.append(lora.adapter)
        scores = self.score(images, texts)
        return {
            "clip_score": scores[0],
            "scored_prompt": global_text,
            "region_scores": dict(zip(names, scores[1:])),
            "region_prompts": dict(zip(names, texts[1:])),
        }

    def _warn_if_truncated(self, text: str) -> None:
        """The backends score the first `context_length` tokens of a longer text: never silently."""
        count = self._backend.count_tokens(text)
        if count > self.context_length:
            warnings.warn(
                f"text of {count} tokens is longer than the CLIP context of {self.context_length}; "
                f"scoring only its first {self.context_length} tokens: {text[:60]!r}",
                stacklevel=3,
            )


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * max(cos, 0) row by row."""
    cos = torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return scale * cos.clamp(min=0)


def with_concepts(text: str, loras: Sequence[ResolvedLora]) -> str:
    """The text with every LoRA's trigger word replaced by its concept word ("a sks cat" -> "a cat")."""
    for lora in loras:
        if lora.trigger and lora.concept:
            trigger, concept = re.escape(lora.trigger), re.escape(lora.concept)
            text = re.sub(rf"(?<!\w){trigger}(?:\s+{concept})?(?!\w)", lora.concept, text)
    return text


def region_box(region) -> Box | None:
    """A Box as is; a mask's bounding box; None without a region."""
    if region is None or isinstance(region, Box):
        return region
    mask = np.asarray(region) > 0.5
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    height, width = mask.shape
    return Box(rows[0] / height, cols[0] / width, (rows[-1] + 1) / height, (cols[-1] + 1) / width)


class _TransformersBackend:
    def __init__(self, model, processor, device: torch.device):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.context_length = self.model.config.text_config.max_position_embeddings

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _features(self.model.get_image_features(pixel_values=pixels))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        ).to(self.device)
        return _features(self.model.get_text_features(**tokens))


def _features(output) -> torch.Tensor:
    """transformers 5 returns an output object whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _OpenClipBackend:
    def __init__(self, model: str, pretrained: str | None, device: torch.device):
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        self.model = self.model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.context_length = self.model.context_length

    def count_tokens(self, text: str) -> int:
        if hasattr(self.tokenizer, "encode"):  # open_clip's SimpleTokenizer: text tokens plus start and end
            return len(self.tokenizer.encode(text)) + 2
        return len(self.tokenizer.tokenizer(text)["input_ids"])  # HFTokenizer wraps a transformers tokenizer

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(pixels)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts, context_length=self.context_length).to(self.device))


def _load_backend(model: str, pretrained: str | None, device: torch.device):
    if model == "tiny":
        from .tiny_clip import tiny_clip

        return _TransformersBackend(*tiny_clip(), device)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return _OpenClipBackend(f"local-dir:{path}", None, device)
        if _is_transformers_clip(path):
            from transformers import CLIPModel, CLIPProcessor

            return _TransformersBackend(CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path), device)
        raise ClipModelError(
            f"CLIP folder {path} holds neither open_clip_config.json (open_clip) nor a config.json of model_type "
            "'clip' (transformers CLIPModel)"
        )
    if path.suffix in (".safetensors", ".pt", ".bin") or path.exists():
        raise ClipModelError(
            f"CLIP model {model} is a file; pass the architecture as model and the file as pretrained "
            "(e.g. model='ViT-B-32', pretrained='weights.safetensors')"
        )
    import open_clip

    if model not in open_clip.list_models():
        raise ClipModelError(
            f"CLIP model '{model}' is neither a folder nor an open_clip architecture (e.g. 'ViT-B-32'); "
            "pass a transformers CLIPModel folder or an open_clip folder"
        )
    if pretrained is None:
        raise ClipModelError(f"open_clip architecture '{model}' needs pretrained=<checkpoint file or tag>")
    if not Path(pretrained).expanduser().is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise ClipModelError(
            f"pretrained '{pretrained}' is neither a checkpoint file nor a known tag of {model} "
            f"({open_clip.list_pretrained_tags_by_model(model)})"
        )
    try:
        return _OpenClipBackend(model, pretrained, device)
    except RuntimeError as error:
        raise ClipModelError(
            f"cannot load open_clip {model} with pretrained '{pretrained}' ({error}); without a reachable hub, "
            "download the checkpoint and pass its path as pretrained"
        ) from error


def _is_transformers_clip(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "clip"
    except json.JSONDecodeError:
        return False
