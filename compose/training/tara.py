"""TARA training: a DreamBooth-style concept LoRA whose cross-attention k/v updates act only at the rare token.

Loss = MSE(eps_hat, eps) + lambda * L_align. The token mask is applied during training exactly as
`tara` applies it at inference, so the k/v updates at every other token are zero, and L_align is
computed inside the attention processors (compose.attention.token_mask). The output holds the
LoRA weights only, with rank/alpha and the rare token and class word in its metadata, so `tara`
inference needs no extra flags. Checkpoints are safetensors plus a small JSON state (no pickles).
With `token_mask=False` the same trainer makes a plain DreamBooth LoRA, the input every other method expects.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..adapters import activate, restore, snapshot
from ..attention.layers import attention_layers, install_processors
from ..attention.token_mask import KeyAlignment, TaraTrainingAttnProcessor, positions_mask
from ..context import DenoiseContext, text_encoders
from ..errors import InvalidOptionError
from ..methods.base import require
from ..saving import save_lora
from ..tokens import check_tokenizers_agree, require_word, token_positions

ADAPTER = "tara_training"
# Which layers a LoRA trains, as trainers name the choice: the attention projections (diffusers'
# DreamBooth script), every linear layer of the transformer blocks (kohya's default), or those plus
# the ResNet convolutions (LyCORIS' LoCon), which draw forms that attention alone struggles to change.
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_TRANSFORMER = (*_ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LAYER_SETS = {"attention": _ATTENTION, "transformer": _TRANSFORMER, "locon": (*_TRANSFORMER, "conv1", "conv2")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class TaraTrainingOptions:
    rare_token: str
    class_word: str
    steps: int = 1000
    lr: float = 1e-4
    rank: int = 8
    alpha: float = 32.0
    lambda_align: float = 1.0
    batch_size: int = 1
    resolution: int | None = None  # image side in pixels; None: the model's native size (512 for SD 1.5)
    grad_clip: float = 1.0
    seed: int = 0
    prompt: str | None = None  # caption of folder images; default "a photo of <rare> <class>"
    checkpoint_every: int = 100  # steps between resumable checkpoints; 0 writes one at the end only
    token_mask: bool = True  # False trains a plain LoRA (k/v updated at every token, no L_align) for other methods
    prior_weight: float = 1.0  # weight of the prior-preservation loss, used when class images are given
    prior_prompt: str | None = None  # caption of folder class images; default "a photo of <class>"
    layers: str = "attention"  # which layers are trained: a key of LAYER_SETS

    def __post_init__(self):
        for name in ("rare_token", "class_word"):
            value = getattr(self, name)
            require(isinstance(value, str) and value.strip() != "", f"TARA training needs a non-empty {name}")
        require(self.rare_token.lower() != self.class_word.lower(), "the rare token and the class word must differ")
        for name, low in (("steps", 1), ("rank", 1), ("batch_size", 1), ("checkpoint_every", 0)):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"TARA training option {name} must be a whole number >= {low}, got {value!r}",
            )
        for name in ("lr", "alpha", "lambda_align", "grad_clip", "prior_weight"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
                f"TARA training option {name} must be a finite number >= 0, got {value!r}",
            )
        require(self.lr > 0 and self.alpha > 0, "TARA training options lr and alpha must be > 0")
        require(
            self.layers in LAYER_SETS,
            f"TARA training option layers must be one of {', '.join(LAYER_SETS)}, got {self.layers!r}",
        )
        require(isinstance(self.token_mask, bool), f"TARA training option token_mask must be True or False, got {self.token_mask!r}")
        require(
            self.resolution is None or (isinstance(self.resolution, int) and self.resolution > 0),
            f"TARA training option resolution must be a positive whole number of pixels, got {self.resolution!r}",
        )

    @property
    def aligns(self) -> bool:
        """The key-alignment loss exists only for the token-masked (TARA) update."""
        return self.token_mask and self.lambda_align > 0

    @property
    def caption(self) -> str:
        return self.prompt or f"a photo of {self.rare_token} {self.class_word}"

    @property
    def prior_caption(self) -> str:
        return self.prior_prompt or f"a photo of {self.class_word}"


@dataclass
class TaraTrainingResult:
    path: Path
    steps: int  # total steps of the run, including steps done before a resume
    mse: list[float] = field(default_factory=list)  # per step of this session
    align: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps_per_second(self) -> float:
        return len(self.mse) / self.seconds if self.seconds else 0.0


def checkpoint_dir(out: str | Path) -> Path:
    """Where the resumable state of a run writing `out` lives: beside it, `<stem>.checkpoint/`."""
    out = Path(out)
    return out.with_name(out.stem + ".checkpoint")


def train_tara(
    pipe,
    data: str | Path | Iterable,
    out: str | Path,
    options: TaraTrainingOptions,
    *,
    resume: bool = False,
    progress: bool = True,
    prior: str | Path | Iterable | None = None,
) -> TaraTrainingResult:
    """Train one TARA concept LoRA on `pipe`'s UNet and save it to `out` (safetensors).

    data: a folder of png/jpg images (captioned `options.caption`), or (image, caption) pairs where
    the image is a PIL image, a path or an HxWx3 uint8 array and caption None means the default.
    prior: class images in the same forms (captioned `options.prior_caption`) for DreamBooth's prior
    preservation: each step adds `prior_weight` x the loss on a batch of them, so the LoRA keeps
    what the base model draws for captions without the rare token.
    resume: continue from the checkpoint beside `out` when there is one. The pipeline is left as
    it was (the training adapter is removed, processors and adapter state restored).
    """
    resolution = options.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    check_resolution(pipe, resolution)
    examples = load_examples(data, options.caption)
    priors = None if prior is None else load_examples(prior, options.prior_caption)
    lora_name = Path(out).stem
    with torch.no_grad():
        batch = prepare_batch(pipe, examples, resolution, options, lora_name)
        prior_batch = None if priors is None else prepare_batch(pipe, priors, resolution, options, lora_name, prior=True)
    with training_adapter(pipe.unet, options) as (params, alignment):
        return run_training(pipe, batch, params, alignment, options, Path(out), resume, progress, prior_batch)


def check_resolution(pipe, resolution: int) -> None:
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    require(
        resolution % multiple == 0,
        f"TARA training resolution {resolution} px must be a multiple of {multiple} px for this model",
    )


def load_examples(data, caption: str) -> list[tuple[Image.Image, str]]:
    """(RGB image, caption) pairs from a folder or from (image, caption) pairs."""
    if isinstance(data, (str, Path)):
        folder = Path(data)
        require(folder.is_dir(), f"training images folder {folder} does not exist")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        require(bool(files), f"training images folder {folder} holds no .png/.jpg files")
        return [(Image.open(p).convert("RGB"), caption) for p in files]
    pairs = [(as_image(image), text or caption) for image, text in data]
    require(bool(pairs), "TARA training got no (image, caption) pairs")
    return pairs


def as_image(image) -> Image.Image:
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise InvalidOptionError(
        f"a training image must be a PIL image, a path or a uint8 array, not {type(image).__name__}"
    )


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side scaled to `resolution`, centre crop, (3, R, R) in [-1, 1]."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)


@dataclass
class TrainingBatch:
    """Everything per example that does not change while training: latent posteriors, text and masks."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    embeds: torch.Tensor
    rare_mask: torch.Tensor
    class_mask: torch.Tensor | None
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds and time_ids, one row per example


def prepare_batch(
    pipe, examples, resolution: int, options: TaraTrainingOptions, lora_name: str, prior: bool = False
) -> TrainingBatch:
    """Encode images and captions once (VAE and text encoder are frozen), and find the token masks.

    Class images for prior preservation (`prior`) have no rare token: their rare mask is empty, so a
    token-masked update leaves their keys and values alone, and they add no alignment term.
    """
    device, vae = pipe.unet.device, pipe.vae
    means, stds = [], []
    for image, _ in examples:
        pixels = image_tensor(image, resolution)[None].to(device, vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    factor = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    check_tokenizers_agree(tokenizers, sorted({caption for _, caption in examples}))
    encoded, rare, concept = {}, [], []
    for _, caption in examples:
        if caption not in encoded:
            encoded[caption] = encode_caption(pipe, caption, resolution)
        length = encoded[caption][0].shape[1]
        rare_positions = [] if prior else require_word(pipe.tokenizer, caption, options.rare_token, lora_name)
        rare.append(positions_mask(rare_positions, length))
        positions = token_positions(pipe.tokenizer, caption, options.class_word)
        require(
            bool(positions) or not options.aligns or prior,
            f"caption '{caption}' lacks the class word '{options.class_word}' that the key-alignment loss needs; "
            "add it to the caption or set lambda_align to 0",
        )
        concept.append(positions_mask(positions, length))
    added = [encoded[caption][1] for _, caption in examples]
    return TrainingBatch(
        latent_mean=(torch.cat(means) - shift) * factor,
        latent_std=torch.cat(stds) * factor,
        embeds=torch.cat([encoded[caption][0] for _, caption in examples]),
        rare_mask=torch.stack(rare).to(device),
        class_mask=torch.stack(concept).to(device) if options.aligns and not prior else None,
        added={key: torch.cat([a[key] for a in added]) for key in added[0]} if added[0] else None,
    )


def encode_caption(pipe, caption: str, resolution: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(hidden states, SDXL's pooled embeds and time ids or None) of one caption, encoded as sampling encodes it."""
    ctx = DenoiseContext(
        pipe=pipe, prompt=caption, negative_prompt=None, loras=[], guidance_scale=1.0, guidance_rescale=0.0,
        height=resolution, width=resolution, num_images=1, clip_skip=None, cross_attention_kwargs=None,
    )  # fmt: skip
    encoders = text_encoders(pipe)
    state = snapshot(encoders)
    try:
        _, embeds = ctx.encode(caption)  # base text encoders: TARA trains the UNet only
    finally:
        restore(encoders, state)
    return embeds, ctx.added_conditions([embeds])


@contextmanager
def training_adapter(
    unet, options: TaraTrainingOptions
) -> Iterator[tuple[dict[str, torch.nn.Parameter], KeyAlignment]]:
    """The UNet with a fresh trainable LoRA and TARA processors; afterwards exactly as before."""
    processors = dict(unet.attn_processors)
    adapter_state = snapshot([unet])
    trainable = {name: p.requires_grad for name, p in unet.named_parameters()}
    was_training = unet.training
    had_adapters = bool(getattr(unet, "peft_config", None))
    config = LoraConfig(
        r=options.rank, lora_alpha=options.alpha, init_lora_weights="gaussian", target_modules=list(LAYER_SETS[options.layers])
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
    try:
        activate(unet, {ADAPTER: 1.0})
        unet.requires_grad_(False)
        params = {name: p for name, p in unet.named_parameters() if f".{ADAPTER}." in name}
        for p in params.values():
            p.requires_grad_(True)
        alignment = KeyAlignment()
        if options.token_mask:
            cross = [layer.name for layer in attention_layers(unet) if layer.cross]
            install_processors(unet, {name: TaraTrainingAttnProcessor(ADAPTER, alignment) for name in cross})
        unet.train()
        yield params, alignment
    finally:
        unet.set_attn_processor(processors)
        if had_adapters:
            unet.delete_adapters(ADAPTER)
        else:  # also remove the peft wrappers, so the UNet is the plain model again
            unet.unload_lora()
        restore([unet], adapter_state)
        for name, p in unet.named_parameters():
            p.requires_grad_(trainable.get(name, False))
        unet.train(was_training)


def denoising_loss(unet, scheduler, batch: TrainingBatch, alignment, size: int, generator) -> torch.Tensor:
    """MSE of the noise (or velocity) prediction on `size` random examples of `batch`, at random timesteps."""
    index = torch.randint(batch.latent_mean.shape[0], (size,), generator=generator)
    mean = batch.latent_mean[index]
    latents = mean + batch.latent_std[index] * torch.randn(mean.shape, generator=generator).to(mean)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (size,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    alignment.start(batch.rare_mask[index], None if batch.class_mask is None else batch.class_mask[index])
    added = None if batch.added is None else {key: value[index] for key, value in batch.added.items()}
    prediction = unet(noisy, timesteps.to(unet.device), batch.embeds[index], added_cond_kwargs=added).sample
    return F.mse_loss(prediction.float(), target.float())


def run_training(
    pipe, batch, params, alignment, options, out: Path, resume: bool, progress: bool, prior: TrainingBatch | None = None
) -> TaraTrainingResult:
    unet = pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(params.values(), lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    start = load_checkpoint(checkpoint_dir(out), params, optimizer, generator, options) if resume else 0
    result = TaraTrainingResult(path=out, steps=start)
    began = time.perf_counter()
    bar = tqdm(range(start, options.steps), initial=start, total=options.steps, desc="train-tara", disable=not progress)
    for step in bar:
        mse = denoising_loss(unet, scheduler, batch, alignment, options.batch_size, generator)
        align = alignment.loss()
        loss = mse + options.lambda_align * align
        if prior is not None:
            loss = loss + options.prior_weight * denoising_loss(unet, scheduler, prior, alignment, options.batch_size, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), options.grad_clip)
        optimizer.step()
        result.mse.append(mse.item())
        result.align.append(align.item())
        result.steps = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse.item():.4f}", align=f"{align.item():.4f}")
        if options.checkpoint_every and result.steps % options.checkpoint_every == 0 and result.steps < options.steps:
            save_checkpoint(checkpoint_dir(out), params, optimizer, generator, options, result.steps)
    result.seconds = time.perf_counter() - began
    save_checkpoint(checkpoint_dir(out), params, optimizer, generator, options, result.steps)
    save_trained_lora(unet, out, options)
    return result


def save_trained_lora(unet, out: Path, options: TaraTrainingOptions) -> Path:
    """The trained adapter's A/B matrices only, with rank/alpha, rare token and class word."""
    layers = {
        ("unet", name): (module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight)
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }
    extra = {"loracompose.method": "tara", "loracompose.tara.lambda_align": str(options.lambda_align)}
    if not options.token_mask:
        extra = {"loracompose.method": "any"}
    return save_lora(
        out, layers, options.rank, options.alpha,
        trigger=options.rare_token, concept=options.class_word, extra_metadata=extra,
    )  # fmt: skip


# What must match for a checkpoint to be resumed: anything that changes the model or the data stream.
_RESUME_KEYS = (
    "rare_token", "class_word", "rank", "alpha", "batch_size", "resolution", "seed", "prompt", "token_mask",
    "prior_weight", "prior_prompt", "layers",
)


def save_checkpoint(folder: Path, params, optimizer, generator, options, step: int) -> None:
    """LoRA weights, AdamW moments and the sampling generator as safetensors; step and options as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora/{name}": p.detach().contiguous() for name, p in params.items()}
    state = optimizer.state_dict()["state"]
    for index, name in enumerate(params):
        for key, value in state.get(index, {}).items():
            tensors[f"adam/{key}/{name}"] = torch.as_tensor(value).contiguous()
    tensors["generator"] = generator.get_state()
    _write_atomically(folder / "state.safetensors", lambda path: save_file(tensors, path, metadata={"step": str(step)}))
    record = {"step": step, "options": asdict(options)}
    _write_atomically(folder / "state.json", lambda path: Path(path).write_text(json.dumps(record, indent=1)))


def load_checkpoint(folder: Path, params, optimizer, generator, options) -> int:
    """Restore a run and return its step; 0 when there is no checkpoint yet."""
    if not (folder / "state.json").is_file():
        return 0
    record = json.loads((folder / "state.json").read_text())
    defaults = asdict(TaraTrainingOptions(options.rare_token, options.class_word))
    for key in _RESUME_KEYS:
        saved = record["options"].get(key, defaults[key])  # a key newer than the checkpoint had its default
        require(
            saved == getattr(options, key),
            f"checkpoint {folder} was made with {key}={saved!r}, not {getattr(options, key)!r}; "
            "use the same settings or another --out",
        )
    tensors = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"lora/{name}"])
    index_of = {name: index for index, name in enumerate(params)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam/"):
            _, moment, name = key.split("/", 2)
            state.setdefault(index_of[name], {})[moment] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(tensors["generator"])
    return int(record["step"])


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(str(temporary))
    os.replace(temporary, path)
