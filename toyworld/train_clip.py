"""Train a toy CLIP for scoring toy-world images against prompts (a stand-in for CLIPScore).

    python -m toyworld.train_clip --out toyworld/clip

Trained contrastively on base scenes, concept scenes and mixed scenes, so it knows the concept
triggers too. Saved as a transformers folder with a CLIPProcessor (same tokenizer as the base model).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from . import default_clip_path
from .dataset import scenes_to_tensors
from .tokenizer import build_tokenizer
from .world import SIZE, base_scene, varied_scene


def clip_scene(seed: int):
    """Captioned varied scenes (free-colour scenes have no caption to learn from)."""
    scene = varied_scene(seed)
    return scene if scene.caption else base_scene(seed)


def build_clip(tokenizer) -> CLIPModel:
    width = 64
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=width, intermediate_size=4 * width,
                  num_hidden_layers=3, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))


def build_processor(tokenizer) -> CLIPProcessor:
    images = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def contrastive_loss(model: CLIPModel, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; identical captions in a batch count as matches, not as negatives."""
    logits = model(input_ids=input_ids, pixel_values=pixels).logits_per_image
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(default_clip_path()))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer = build_tokenizer()
    pixels, captions = scenes_to_tensors(clip_scene(s) for s in range(args.images))
    input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    model = build_clip(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        index = torch.randint(len(pixels), (args.batch,), generator=generator)
        loss = contrastive_loss(model, pixels[index], input_ids[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {(time.time() - start) / 60:.1f} min", flush=True)
    model.eval().save_pretrained(args.out)
    build_processor(tokenizer).save_pretrained(args.out)
    print(f"held-out caption retrieval among 200: {retrieval_accuracy(model, tokenizer):.0%}", flush=True)


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, tokenizer, count: int = 200) -> float:
    """How often an unseen image scores its own caption highest among `count` captions."""
    pixels, captions = scenes_to_tensors(clip_scene(s) for s in range(10**6, 10**6 + count))
    input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    logits = model(input_ids=input_ids, pixel_values=pixels).logits_per_image
    chosen = [captions[i] for i in logits.argmax(1).tolist()]
    return sum(a == b for a, b in zip(chosen, captions)) / count


if __name__ == "__main__":
    main()
