"""Find, check and load LoRA files as named adapters of a pipeline.

Every check runs before any denoising, on the safetensors header, the file's length, the model's
layer shapes and (once per file contents) the tensor values: a user sees one clear error naming
the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn

from .errors import (
    CorruptLoraFileError,
    DuplicateLoraNameError,
    IncompatibleLoraError,
    LoraFileNotFoundError,
    NonFiniteLoraError,
    NotSafetensorsError,
    TruncatedLoraFileError,
    UnsupportedAdapterTypeError,
)
from .lora_keys import AdapterLayer, LoraLayerShape, adapter_layers, layer_shape
from .peft_adapters import load_typed_adapter, lycoris_layers_lifted
from .spec import LoraSpec, ResolvedLora
from .unet_names import original_to_diffusers_key

TRIGGER_KEY = "loracompose.trigger"
CONCEPT_KEY = "loracompose.concept"
PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl"}
PREFERRED_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024

@dataclass(frozen=True)
class LoraFileInfo:
    """What the header of a LoRA file says, read without loading any tensor."""

    path: Path
    layers: dict[tuple[str, str], LoraLayerShape]
    metadata: dict[str, str]
    format: str  # file layout: "diffusers" (also PEFT) or "kohya" (also LyCORIS)
    adapter_type: str = "LoRA"  # LoRA, LoCon (LoRA with conv layers), DoRA, LoHa or LoKr
    parts: dict[tuple[str, str], AdapterLayer] = field(default_factory=dict, compare=False)

    @property
    def components(self) -> set[str]:
        return {component for component, _ in self.layers}


def resolve_source(source: str | Path) -> Path:
    """Local file, folder holding one LoRA file, or hub id -> path of one .safetensors file."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _weight_file_in_folder(path)
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        return _download_from_hub(text)
    raise LoraFileNotFoundError(f"LoRA file {text} does not exist; check the path (or pass a hub id 'org/name')")


def _weight_file_in_folder(folder: Path) -> Path:
    preferred = folder / PREFERRED_WEIGHT_NAME
    if preferred.is_file():
        return preferred
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found pickled {pickled}; convert them to safetensors)" if pickled else ""
        raise LoraFileNotFoundError(f"folder {folder} holds no .safetensors LoRA file{hint}")
    names = [p.name for p in candidates]
    raise LoraFileNotFoundError(f"folder {folder} holds several .safetensors files {names}; pass one file instead")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        names = [n for n in list_repo_files(repo_id) if n.endswith(".safetensors")]
        name = PREFERRED_WEIGHT_NAME if PREFERRED_WEIGHT_NAME in names else (names[0] if len(names) == 1 else None)
        if name is None:
            raise LoraFileNotFoundError(
                f"hub repository {repo_id} holds {len(names)} .safetensors files; download one and pass its path"
            )
        return Path(hf_hub_download(repo_id, name))
    except LoraFileNotFoundError:
        raise
    except Exception as error:
        raise LoraFileNotFoundError(
            f"LoRA {repo_id} is not a local path and the hub could not provide it ({type(error).__name__}); "
            "download the .safetensors file and pass its path"
        ) from error


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse a safetensors header by hand so a pickle is refused before anything executes it."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise NotSafetensorsError(
            f"{path} is a pickled checkpoint ({path.suffix}); pickles are never loaded because they can run code. "
            "Convert it to .safetensors first"
        )
    with open(path, "rb") as handle:
        head = handle.read(9)
        # A safetensors header starts with its length, then '{': a length whose low byte is 0x80 is not a pickle.
        if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise NotSafetensorsError(
                f"{path} is a pickled (torch.save) file, not safetensors; convert it to .safetensors first"
            )
        if len(head) < 9:
            raise CorruptLoraFileError(f"{path} is too short to be a safetensors file; download it again")
        (size,) = struct.unpack("<Q", head[:8])
        if size <= 1 or size > _MAX_HEADER_BYTES or size > path.stat().st_size - 8:
            raise CorruptLoraFileError(f"{path} has no valid safetensors header; the file is damaged, download it again")
        raw = head[8:] + handle.read(size - 1)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptLoraFileError(f"{path} has a corrupt safetensors header ({error}); download it again") from error
    if not isinstance(header, dict):
        raise CorruptLoraFileError(f"{path} has a corrupt safetensors header; download it again")
    metadata = header.pop("__metadata__", None) or {}
    check_data_length(path, header, path.stat().st_size - 8 - size)
    return header, {str(k): str(v) for k, v in metadata.items()}


def check_data_length(path: Path, header: dict[str, dict], data_bytes: int) -> None:
    """The header's tensor offsets must lie inside the file: a download cut short passes the header check
    and would fail only when the weights load, far from any message about the file."""
    ends = []
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CorruptLoraFileError(f"{path}: tensor {key} has no valid data offsets; the file is damaged")
        ends.append(offsets[1])
    needed = max(ends, default=0)
    if data_bytes < needed:
        raise TruncatedLoraFileError(
            f"{path} looks truncated (a download cut short?): its header describes {needed} bytes of tensor data "
            f"but the file holds {data_bytes}; download it again"
        )


def inspect_lora_file(path: Path) -> LoraFileInfo:
    """Read the adapted layers (component, module key, shape), adapter type and metadata of a file's header."""
    header, metadata = read_header(path)
    parts, kohya = adapter_layers(path, header, module_key)
    layers = {where: layer_shape(path, where, layer) for where, layer in parts.items()}
    kinds = sorted({shape.kind for shape in layers.values()})
    if len(kinds) > 1:
        raise UnsupportedAdapterTypeError(
            f"{path} mixes {' and '.join(kinds)} layers in one file, which cannot be loaded as one adapter; "
            "save each type as a file of its own"
        )
    adapter_type = kinds[0]
    if adapter_type == "LoRA" and any(len(layer.shape("down")) == 4 for layer in parts.values()):
        adapter_type = "LoCon"
    return LoraFileInfo(path, layers, metadata, "kohya" if kohya else "diffusers", adapter_type, parts)


def module_key(name: str) -> str:
    """One spelling for a layer in every format: underscores, no peft wrapper, no 'text_model' prefix."""
    key = name.replace(".base_layer", "").replace(".", "_")
    return key.removeprefix("text_model_")


def model_layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(fan-in, out) of every Linear/Conv2d layer of a model, keyed by `module_key`: a conv's fan-in is its
    input channels times its kernel size, which is what every adapter type's stored factors determine."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            shapes[module_key(name)] = (module.weight[0].numel(), module.weight.shape[0])
    return shapes


def check_compatible(info: LoraFileInfo, pipe) -> None:
    """Every LoRA layer must exist in the pipeline with the same shape, or the LoRA is for another model.

    kohya SDXL files name UNet layers in the original layout (`input_blocks_4_1_...`); they are
    compared under their diffusers names, derived from this UNet's config (`diffusers_key`).
    """
    mismatch = family_mismatch(info, pipe)
    hint = f"This looks like {mismatch}" if mismatch else "It was probably made for another base model"
    for component in sorted(info.components):
        model = getattr(pipe, component, None)
        if model is None:
            raise IncompatibleLoraError(
                f"{info.path} has weights for '{component}', which this pipeline does not have. {hint}; "
                "use a LoRA made for this base model"
            )
        shapes = model_layer_shapes(model)
        wanted = {
            diffusers_key(component, key, pipe): shape
            for (comp, key), shape in info.layers.items()
            if comp == component
        }
        missing = sorted(key for key in wanted if key not in shapes)
        wrong = sorted(
            key for key, s in wanted.items() if key in shapes and shapes[key] != (s.in_features, s.out_features)
        )
        if missing or wrong:
            example = (missing or wrong)[0]
            detail = (
                f"{len(missing)} of its {len(wanted)} {component} layers do not exist in the model (e.g. {example})"
                if missing
                else f"{len(wrong)} {component} layers have other shapes (e.g. {example}: LoRA "
                f"{wanted[example].in_features}->{wanted[example].out_features}, model {shapes[example][0]}->{shapes[example][1]})"
            )
            example_hint = "" if mismatch else " (e.g. an SDXL LoRA on SD 1.5)"
            raise IncompatibleLoraError(
                f"{info.path} does not fit this model: {detail}. {hint}{example_hint}; use a LoRA trained for this one"
            )


def diffusers_key(component: str, key: str, pipe) -> str:
    """A LoRA layer key under the model's own (diffusers) name.

    Original-layout UNet keys are kohya's SDXL convention (its SD 1.x files use diffusers names), so
    they are translated for SDXL UNets only; elsewhere they are reported as missing layers.
    """
    if component != "unet" or model_family(pipe) != "SDXL":
        return key
    return original_to_diffusers_key(key, pipe.unet.config) or key


def model_family(pipe) -> str:
    """SDXL for two text encoders, else SD 2.x or SD 1.x by the text width."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "SDXL"
    return "SD 2.x" if pipe.unet.config.cross_attention_dim == 1024 else "SD 1.x"


def lora_family(info: LoraFileInfo, pipe) -> str | None:
    """The model family a LoRA file was made for, when its layers tell (None when they do not).

    SDXL: a second text encoder, stacked transformer blocks (SD 1.x/2.x have one per attention
    block) or 2048-wide text. SD 1.x/2.x: text as wide as CLIP-L/OpenCLIP-H alone, or on an SDXL
    pipeline as wide as its first text encoder alone.
    """
    if "text_encoder_2" in info.components or any(
        re.search(r"transformer_blocks_[1-9]", key) for comp, key in info.layers if comp == "unet"
    ):
        return "SDXL"
    widths = {
        shape.in_features for (comp, key), shape in info.layers.items() if comp == "unet" and _CROSS_KV.search(key)
    }
    if 2048 in widths:
        return "SDXL"
    first_encoder = getattr(getattr(pipe, "text_encoder", None), "config", None)
    one_encoder = {768, 1024}
    if getattr(pipe, "text_encoder_2", None) is not None and first_encoder is not None:
        one_encoder.add(first_encoder.hidden_size)
    if widths & one_encoder:
        return "SD 2.x" if 1024 in widths else "SD 1.x"
    return None


def family_mismatch(info: LoraFileInfo, pipe) -> str | None:
    """"an SDXL LoRA on an SD 1.x model" when the file's family is known and differs from the pipeline's."""
    made_for, model = lora_family(info, pipe), model_family(pipe)
    if made_for is None or made_for == model:
        return None
    return f"an {made_for} LoRA on an {model} model"


_CROSS_KV = re.compile(r"attn2_to_[kv]$")


def trigger_from_metadata(metadata: dict[str, str]) -> str | None:
    """Our own key first, then kohya's most frequent training tag."""
    if metadata.get(TRIGGER_KEY):
        return metadata[TRIGGER_KEY]
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return None
    try:
        datasets = json.loads(raw)
        counts = Counter()
        for tags in datasets.values():
            counts.update({tag.strip(): int(n) for tag, n in tags.items() if tag.strip()})
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
    return counts.most_common(1)[0][0] if counts else None


_sha_cache: dict[tuple[str, int, int], str] = {}
_finite_hashes: set[str] = set()


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so big files are hashed once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _sha_cache[key] = digest.hexdigest()
    return _sha_cache[key]


def check_finite_values(path: Path, sha256: str) -> None:
    """NaN or infinity in a LoRA turns every image black without an error; checked once per file contents."""
    if sha256 in _finite_hashes:
        return
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if not torch.isfinite(handle.get_tensor(key)).all():
                raise NonFiniteLoraError(
                    f"{path}: tensor {key} holds NaN or infinite values, which would make black images; "
                    "the file is damaged or was saved from a diverged training run: use another file"
                )
    _finite_hashes.add(sha256)


def default_adapter_name(source: str | Path, path: Path) -> str:
    """The file's stem; diffusers' `save_lora_weights` names every file alike, so those take their folder's
    (or hub repository's) name."""
    if path.name != PREFERRED_WEIGHT_NAME:
        return re.sub(r"\W", "_", path.stem)
    given = Path(str(source)).name
    return re.sub(r"\W", "_", given if given and given != path.name else path.absolute().parent.name)


def adapter_names(specs: list[LoraSpec], paths: list[Path]) -> list[str]:
    """One adapter name per LoRA: its own `name`, else `default_adapter_name` made unique with _2, _3, ...

    Names a user chose are never changed, so two LoRAs given the same one are refused.
    """
    given = [spec.name for spec in specs if spec.name]
    repeated = next((name for name in given if given.count(name) > 1), None)
    if repeated:
        raise DuplicateLoraNameError(
            f"two LoRAs are both named '{repeated}'; give them distinct names with LoraSpec(name=...) "
            "(on the command line --lora FILE@NAME)"
        )
    taken, names = set(given), []
    for spec, path in zip(specs, paths):
        name = spec.name
        if not name:
            base = name = default_adapter_name(spec.source, path)
            number = 2
            while name in taken:
                name, number = f"{base}_{number}", number + 1
            taken.add(name)
        names.append(name)
    return names


def resolve_loras(pipe, specs: Iterable[LoraSpec | str | Path]) -> list[ResolvedLora]:
    """Find, check and hash every LoRA of a call; nothing is loaded into the model yet."""
    specs = [spec if isinstance(spec, LoraSpec) else LoraSpec(spec) for spec in specs]
    paths = [resolve_source(spec.source) for spec in specs]
    resolved: list[ResolvedLora] = []
    for spec, path, adapter in zip(specs, paths, adapter_names(specs, paths)):
        info = inspect_lora_file(path)
        check_compatible(info, pipe)
        sha256 = file_sha256(path)
        check_finite_values(path, sha256)
        resolved.append(
            ResolvedLora(
                spec=spec,
                path=path,
                sha256=sha256,
                adapter=adapter,
                trigger=spec.trigger or trigger_from_metadata(info.metadata),
                concept=spec.concept or info.metadata.get(CONCEPT_KEY) or None,
                metadata=info.metadata,
                has_text_encoder=bool(info.components - {"unet"}),
            )
        )
    return resolved


def load_adapters(pipe, loras: list[ResolvedLora]) -> None:
    """Load each LoRA as a named adapter once; a later call with the same file reuses it."""
    loaded: dict[str, str] = pipe.__dict__.setdefault("_loaded_lora_hashes", {})
    present = set(_adapter_names(pipe))
    for lora in loras:
        if loaded.get(lora.adapter) == lora.sha256 and lora.adapter in present:
            continue
        if lora.adapter in present:
            if lora.adapter not in loaded:
                raise DuplicateLoraNameError(
                    f"the pipeline already has an adapter named '{lora.adapter}' that this toolkit did not load; "
                    "give the LoRA another name with LoraSpec(name=...)"
                )
            pipe.delete_adapters(lora.adapter)
        info = inspect_lora_file(lora.path)
        models = [getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None)]
        lora_layers = info.adapter_type in ("LoRA", "LoCon", "DoRA")  # peft's LoRA layers: added below LoHa/LoKr ones
        with _expected_load_notices_silenced(), lycoris_layers_lifted(models if lora_layers else []):
            if info.adapter_type in ("DoRA", "LoHa", "LoKr"):
                _load_as_peft_type(pipe, info, lora.adapter)
            else:
                pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora.adapter)
        loaded[lora.adapter] = lora.sha256


def _load_as_peft_type(pipe, info: LoraFileInfo, adapter: str) -> None:
    """DoRA, LoHa and LoKr files, component by component, on the layers their keys name."""
    for component in sorted(info.components):
        model = getattr(pipe, component)
        names = {module_key(name): name.split(".base_layer")[0] for name, _ in model.named_modules()}
        targets = {
            names[diffusers_key(component, key, pipe)]: (shape, info.parts[(comp, key)])
            for (comp, key), shape in info.layers.items()
            if comp == component
        }
        load_typed_adapter(model, info.path, component, info.adapter_type, targets, adapter, info.metadata, info.format == "kohya")


class _DropNotice(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


@contextmanager
def _expected_load_notices_silenced():
    """Loading a UNet-only LoRA, or a second adapter, makes diffusers, peft and transformers print notices
    that are expected here (no text-encoder keys; several adapters; other adapters' keys "missing")."""
    drop = _DropNotice("No LoRA keys associated to", "led to missing keys in the model", "LOAD REPORT")
    names = ("diffusers.loaders.lora_base", "diffusers.utils.peft_utils", "transformers.integrations.peft")
    loggers = [logging.getLogger(name) for name in names]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def _adapter_names(pipe) -> list[str]:
    names = []
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        config = getattr(model, "peft_config", None) if model is not None else None
        names.extend(config or {})
    return names
