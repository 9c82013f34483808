"""A tiny Stable Diffusion pipeline with random weights, built offline from configs.

Same classes as SD 1.5 (UNet2DConditionModel, AutoencoderKL with an 8x downscale, a CLIP text
encoder and tokenizer, DPM-Solver++), a few MB instead of 2 GB, and loadable through the very
code path the real model uses. Its images are noise: it exists so the whole system can be run and
tested where no weights can be downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def _byte_level_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary with no merges: every byte alone, so any text encodes."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, []


def build_tiny_pipeline() -> Any:
    """A StableDiffusionPipeline with random weights (seeded, so every build is identical)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vocab, merges = _byte_level_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=MAX_TOKENS,
        )
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(directory: Path) -> Path:
    """Write the tiny pipeline to DIRECTORY in safetensors; returns the directory."""
    pipe = build_tiny_pipeline()
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    (directory / "SDQUEUE_TINY_MODEL.json").write_text(
        json.dumps({"note": "random weights: images are noise; for tests and the demo only"})
    )
    return directory


def is_tiny_model(directory: str | Path) -> bool:
    return (Path(directory) / "SDQUEUE_TINY_MODEL.json").is_file()
