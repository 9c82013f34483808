"""The full-size Stable Diffusion 1.5 architecture with random weights, built offline.

Same configs as SD 1.5 (859.5M-parameter UNet, 83.7M VAE, 123.1M CLIP text encoder), so every
kernel, memory footprint and load time is the real model's; only the pictures are noise. The
tokenizer is the tiny model's byte-level one (any text encodes; ids stay below the 49,408-row
embedding). Nothing is downloaded.

    python bench/fullsize.py .bench-cache/sd15-random-fp16   # ~2.1 GB, built once
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/x.py` finds sdqueue/bench

from sdqueue.tinymodel import MAX_TOKENS, _byte_level_vocab

CACHE_DIR = Path(__file__).resolve().parent.parent / ".bench-cache"
DEFAULT_DIR = CACHE_DIR / "sd15-random-fp16"
MARKER = "SDQUEUE_FULLSIZE_RANDOM.json"
CLIP_VOCAB = 49408
"""Rows in SD 1.5's token embedding: kept, so the text encoder has its real 123.1M parameters."""


def unet_config() -> dict[str, Any]:
    """UNet2DConditionModel kwargs of SD 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
    }


def vae_config() -> dict[str, Any]:
    """AutoencoderKL kwargs of SD 1.5's VAE: 8x downscale, 4 latent channels."""
    return {
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    }


def text_config(bos_id: int, eos_id: int) -> dict[str, Any]:
    """CLIPTextConfig kwargs of SD 1.5's text encoder (CLIP ViT-L/14's text tower)."""
    return {
        "vocab_size": CLIP_VOCAB,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 768,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }


def scheduler_config() -> dict[str, Any]:
    """SD 1.5's noise schedule, for DPMSolverMultistepScheduler (DPM-Solver++ 2M)."""
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
    }


def build_pipeline(device: str = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """A StableDiffusionPipeline of SD 1.5's shape with random weights, made on DEVICE in DTYPE."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    vocab, merges = _byte_level_vocab()
    # Built in fp32 (random init in fp16 would round the init itself), then cast once; on a GPU the
    # parameters are allocated there directly, so nothing 2 GB crosses PCIe.
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config())
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**text_config(vocab["<|startoftext|>"], vocab["<|endoftext|>"]))
        )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    pipe: Any = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe: Any) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }


def save_fullsize(directory: Path, device: str = "cpu") -> Path:
    """Build the random-weight pipeline and save it to DIRECTORY in fp16 safetensors."""
    import torch

    pipe = build_pipeline(device=device, dtype=torch.float16)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    (directory / MARKER).write_text(
        json.dumps(
            {"note": "SD 1.5 architecture, random weights, fp16", "parameters": parameter_counts(pipe)}
        )
    )
    return directory


def ensure_fullsize(directory: Path = DEFAULT_DIR, device: str = "cpu") -> Path:
    """DIRECTORY holding the saved pipeline, built first if it isn't there (minutes on a CPU)."""
    if not (directory / MARKER).is_file():
        started = time.perf_counter()
        print(f"building the full-size random-weight SD 1.5 pipeline in {directory} ...", flush=True)
        save_fullsize(directory, device=device)
        print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path, nargs="?", default=DEFAULT_DIR)
    parser.add_argument("--device", default="cpu", help="where to build the weights before saving")
    args = parser.parse_args()
    path = ensure_fullsize(args.directory, device=args.device)
    size = sum(p.stat().st_size for p in path.rglob("*.safetensors"))
    print(f"{path}  {size / 1e9:.2f} GB of safetensors  {json.loads((path / MARKER).read_text())}")


if __name__ == "__main__":
    main()
