"""The model alone on a GPU: SD 1.5's architecture, fp16, 512x512, 20 steps of DPM-Solver++.

Builds the full-size pipeline with random weights directly on the device (bench/fullsize.py's
configs; nothing downloaded), wraps it in sdqueue's DiffusersEngine (the production render path:
per-image CPU generators, NaN check, uint8 PIL images) and times batches of 1/4/8 images with:

- ``sdpa``: PyTorch's scaled_dot_product_attention, diffusers' default and production's;
- ``xformers``: when ``import xformers.ops`` works (skipped with the reason otherwise);
- ``compile``: the UNet in channels_last, ``torch.compile(mode="reduce-overhead", fullgraph=True,
  dynamic=False)``. Why reduce-overhead: it adds CUDA graphs, which remove the launch cost of the
  UNet's ~1,000 kernels per step (what dominates batch 1 on an H100, ~20-30 ms a step) and compiles
  in about a minute per batch size; "max-autotune(-no-cudagraphs)" grid-searches GEMM/conv
  configs per shape for several minutes each, which does not fit one ~6-minute device run,
  for convolutions cuDNN already tunes. The compile warm-up is timed and reported, not counted.

Prints s/image, images/s and the fraction of the GPU's dense fp16 peak (29.6 TFLOP per 512x512
image at 20 steps with CFG, from ../shared/FACTS.md), checks every output is finite and not black,
and that a batch's pixels match single runs of the same seeds within fp16 tolerance.
Writes all of it to --out as JSON, after every measurement (a timeout still leaves the figures).

    python bench/gpu.py --out gpu.json                            # on the GPU box
    python bench/gpu.py --device cpu --tiny --out /tmp/gpu.json   # the logic, on any CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/x.py` finds sdqueue/bench

from bench.common import hardware, hardware_line, quiet_libraries

# Dense fp16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch's device name;
# the first match wins, so longer names come first.
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]
# SD 1.5 arithmetic (../shared/FACTS.md): TFLOP at 512x512; UNet and VAE scale with the pixels.
UNET_CFG_STEP_TFLOP = 1.354
VAE_DECODE_TFLOP = 2.48
TEXT_ENCODER_TFLOP = 0.026
CHECK_TOLERANCE_LEVELS = 2.0
"""Batched vs single: mean |difference| in 8-bit levels allowed (fp16 sums in another order)."""


def peak_tflops(name: str | None) -> float | None:
    for key, value in PEAK_TFLOPS:
        if name and key in name:
            return value
    return None


def analytic_flops_per_image(size: int, steps: int) -> float:
    scale = size * size / 512**2
    return (steps * UNET_CFG_STEP_TFLOP * scale + VAE_DECODE_TFLOP * scale + TEXT_ENCODER_TFLOP) * 1e12


def counted_flops_per_image(engine: Any, requests: list[Any]) -> float:
    """FLOPs of one single-image render, counted by torch's FlopCounterMode (matmul, conv, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdqueue.engine import RenderItem

    counter = FlopCounterMode(display=False)
    with counter:
        engine.render([RenderItem(requests[0], 0)])
    return float(counter.get_total_flops())


def pixel_diff(got: Any, want: Any) -> dict[str, float]:
    import numpy as np

    diff = np.abs(np.asarray(got).astype(np.int16) - np.asarray(want).astype(np.int16))
    return {
        "max_levels": float(diff.max()),
        "mean_levels": float(diff.mean()),
        "share_over_8_levels": float((diff > 8).mean()),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.started = time.perf_counter()
        self.cuda = args.device.startswith("cuda")
        self.out: dict[str, Any] = {
            "benchmark": "gpu: SD 1.5 architecture, random weights, the engine's render path",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "config": {},
            "results": [],
            "skipped": [],
            "checks": {},
        }
        self.outputs: dict[tuple[str, int], list[Any]] = {}

    # --- bookkeeping ---

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return bool(self.elapsed() > self.args.time_budget_s)

    def save(self) -> None:
        self.out["elapsed_s"] = round(self.elapsed(), 2)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.out, indent=2, default=str) + "\n")

    def skip(self, backend: str, reason: str, batch: int | None = None) -> None:
        print(f"   skipped {backend}{'' if batch is None else f' batch {batch}'}: {reason}", flush=True)
        self.out["skipped"].append({"backend": backend, "batch": batch, "reason": reason})
        self.save()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    # --- the pipeline ---

    def build(self) -> Any:
        from bench.fullsize import build_pipeline
        from sdqueue.engine import DiffusersEngine

        torch, args = self.torch, self.args
        dtype = getattr(torch, args.dtype)
        started = time.perf_counter()
        if args.tiny:
            from sdqueue.tinymodel import build_tiny_pipeline

            pipe = build_tiny_pipeline().to(device=args.device, dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe = build_pipeline(device=args.device, dtype=dtype)
        self.sync()
        self.out["build_s"] = round(time.perf_counter() - started, 2)
        model = "tiny random-weight SD" if args.tiny else "SD 1.5 architecture, random weights"
        engine = DiffusersEngine(pipe, model_id=model, model_revision=None, device=args.device)
        print(f"   built {model} on {args.device} ({args.dtype}) in {self.out['build_s']} s", flush=True)
        return engine

    def requests(self, count: int) -> list[Any]:
        from sdqueue.jobs import GenerationRequest

        a = self.args
        # One request per seed, as cross-job batching would group them: same shape, own prompt.
        return [
            GenerationRequest(
                prompt=f"a lighthouse on a cliff at dawn, oil painting, take {seed}",
                negative_prompt="blurry",
                steps=a.steps,
                width=a.size,
                height=a.size,
                seed=seed,
            )
            for seed in range(count)
        ]

    def render(self, engine: Any, requests: list[Any]) -> tuple[float, list[Any] | None, str | None]:
        """Seconds, images (None on failure) and the error, for one engine call on REQUESTS."""
        from sdqueue.engine import RenderItem
        from sdqueue.errors import RenderError

        self.sync()
        started = time.perf_counter()
        try:
            images = engine.render([RenderItem(request, 0) for request in requests])
        except RenderError as exc:  # NaN pixels: recorded as a failed check, the run goes on
            self.sync()
            return time.perf_counter() - started, None, str(exc)
        self.sync()
        return time.perf_counter() - started, images, None

    # --- measurements ---

    def run_backend(self, engine: Any, backend: str, flops_per_image: float, peak: float | None) -> None:
        torch, a = self.torch, self.args
        for batch in a.batches:
            if self.over_budget():
                self.skip(backend, f"time budget of {a.time_budget_s} s spent", batch)
                continue
            requests = self.requests(batch)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            samples: list[float] = []
            errors: list[str] = []
            black, redecoded, images = 0, 0, None
            try:
                warmups = [self.render(engine, requests)[0] for _ in range(a.warmup)]
                for _ in range(a.repeats):
                    seconds, images, error = self.render(engine, requests)
                    samples.append(seconds)
                    if error:
                        errors.append(error)
                    elif images is not None:
                        black += sum(1 for im in images if max(hi for _, hi in im.getextrema()) == 0)
                        # The engine decodes fp16 overflows again in fp32 and says so per image.
                        redecoded += sum(
                            1 for im in images if any("overflowed" in w for w in im.info.get("warnings", []))
                        )
            except Exception as exc:  # e.g. out of memory at batch 8: the other batches still count
                self.skip(backend, f"failed: {type(exc).__name__}: {exc}"[:500], batch)
                if self.cuda:
                    torch.cuda.empty_cache()
                continue
            if images is not None:
                self.outputs[(backend, batch)] = images
            per_call = median(samples)
            rate = batch / per_call
            entry = {
                "backend": backend,
                "batch": batch,
                "s_per_call": per_call,
                "s_per_image": per_call / batch,
                "images_per_s": rate,
                "achieved_tflops": rate * flops_per_image / 1e12,
                "fraction_of_peak": (rate * flops_per_image / 1e12 / peak) if peak else None,
                "samples_s": samples,
                "warmup_s": warmups,
                "finite": not errors,
                "errors": errors[:1],
                "black_images": black,
                "fp16_overflow_redecoded_in_fp32": redecoded,
                "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if self.cuda else None,
            }
            self.out["results"].append(entry)
            frac = f"{entry['fraction_of_peak']:.1%} of peak" if peak else "peak unknown"
            print(
                f"   {backend:9s} batch {batch}: {per_call / batch:7.3f} s/image  {rate:7.2f} images/s  "
                f"{entry['achieved_tflops']:8.3f} TFLOP/s ({frac})  warm-up {sum(warmups):.1f} s"
                + ("" if entry["finite"] else "  NOT FINITE")
                + (f"  {black} black" if black else "")
                + (f"  {redecoded} re-decoded in fp32 after fp16 overflow" if redecoded else ""),
                flush=True,
            )
            self.save()

    def check_batch_vs_single(self, engine: Any) -> None:
        """Batch images must match single runs of the same seeds (fp16 tolerance)."""
        batches = [b for b in self.args.batches if b > 1 and ("sdpa", b) in self.outputs]
        if not batches:
            self.out["checks"]["batch_vs_single"] = {"skipped": "no batched sdpa output"}
            return
        batch = min(batches)
        requests = self.requests(batch)
        diffs: list[dict[str, Any]] = []
        for index, request in enumerate(requests):
            single = self.outputs.get(("sdpa", 1)) if index == 0 else None
            if single is None:
                _, single, _ = self.render(engine, [request])
            if single is None:
                diffs.append({"error": "single run not finite"})
                continue
            diffs.append(pixel_diff(self.outputs[("sdpa", batch)][index], single[0]))
        ok = all("error" not in d and d["mean_levels"] <= CHECK_TOLERANCE_LEVELS for d in diffs)
        self.out["checks"]["batch_vs_single"] = {
            "batch": batch,
            "per_image": diffs,
            "tolerance_mean_levels": CHECK_TOLERANCE_LEVELS,
            "pass": ok,
        }
        worst = max((d.get("mean_levels", float("inf")) for d in diffs), default=0.0)
        print(
            f"   check batch {batch} vs single runs: worst mean |diff| {worst:.3f} levels -> {ok}", flush=True
        )
        self.save()

    def compile_unet(self, engine: Any) -> None:
        torch, a = self.torch, self.args
        pipe = engine.pipe
        pipe.unet.to(memory_format=torch.channels_last)
        options: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": a.compile_backend}
        if a.compile_backend == "inductor":
            options["mode"] = a.compile_mode
        pipe.unet = torch.compile(pipe.unet, **options)

    def run(self) -> None:
        torch, a = self.torch, self.args
        # Production's settings, not a tuned harness: no cudnn.benchmark, no TF32 knobs.
        name = torch.cuda.get_device_name(0) if self.cuda else None
        hw = hardware()
        peak = a.peak_tflops or peak_tflops(name)
        self.out["hardware"] = hw
        self.out["device_name"] = name or f"CPU: {hw['cpu']}"
        print("== gpu: SD 1.5 architecture (random weights) through DiffusersEngine.render ==", flush=True)
        print(f"   {hardware_line(hw)}", flush=True)
        print(f"   device {self.out['device_name']}, dense fp16 peak {peak or 'unknown'} TFLOP/s", flush=True)
        self.out["config"] = {
            "device": a.device,
            "dtype": a.dtype,
            "tiny": a.tiny,
            "size": a.size,
            "steps": a.steps,
            "guidance_scale": 7.5,
            "scheduler": "dpmpp_2m (DPM-Solver++ 2M)",
            "batches": a.batches,
            "backends": a.backends,
            "compile": {"backend": a.compile_backend, "mode": a.compile_mode, "fullgraph": True},
            "repeats": a.repeats,
            "warmup": a.warmup,
            "peak_tflops": peak,
            "time_budget_s": a.time_budget_s,
        }
        engine = self.build()
        if a.tiny:
            flops = counted_flops_per_image(engine, self.requests(1))
            source = "counted by torch.utils.flop_counter.FlopCounterMode on one image"
        else:
            flops = analytic_flops_per_image(a.size, a.steps)
            source = "../shared/FACTS.md: steps x 1.354 + 2.48 (VAE) + 0.026 (text) TFLOP at 512x512"
        self.out["flops_per_image"] = flops
        self.out["flops_source"] = source
        print(f"   {flops / 1e9:,.1f} GFLOP per image ({source})", flush=True)
        self.save()

        for backend in a.backends:
            if self.over_budget():
                self.skip(backend, f"time budget of {a.time_budget_s} s spent")
                continue
            try:
                if backend == "sdpa":
                    self.run_backend(engine, backend, flops, peak)
                    self.check_batch_vs_single(engine)
                elif backend == "xformers":
                    try:
                        import xformers.ops  # noqa: F401
                    except Exception as exc:  # ImportError, or its compiled part failing to load
                        self.skip(backend, f"xformers not importable: {type(exc).__name__}: {exc}"[:300])
                        continue
                    engine.pipe.enable_xformers_memory_efficient_attention()
                    try:
                        self.run_backend(engine, backend, flops, peak)
                    finally:
                        engine.pipe.disable_xformers_memory_efficient_attention()  # back to SDPA
                elif backend == "compile":
                    eager_unet = engine.pipe.unet
                    self.compile_unet(engine)
                    try:
                        self.run_backend(engine, backend, flops, peak)
                    finally:
                        engine.pipe.unet = eager_unet
                    compiled, eager = self.outputs.get(("compile", 1)), self.outputs.get(("sdpa", 1))
                    if compiled is not None and eager is not None:
                        diff = pixel_diff(compiled[0], eager[0])
                        self.out["checks"]["compile_vs_eager"] = diff
                        print(f"   check compiled vs eager (batch 1): {diff}", flush=True)
                else:
                    self.skip(backend, "unknown backend")
            except Exception as exc:  # one backend failing must not lose the others' figures
                self.skip(backend, f"failed: {type(exc).__name__}: {exc}"[:500])
        results = self.out["results"]
        self.out["checks"]["all_finite"] = all(r["finite"] for r in results) if results else None
        self.out["checks"]["black_images"] = sum(r["black_images"] for r in results)
        self.out["checks"]["fp16_overflow_redecoded_in_fp32"] = sum(
            r["fp16_overflow_redecoded_in_fp32"] for r in results
        )
        best = max(results, key=lambda r: r["images_per_s"], default=None)
        if best:
            base = next((r for r in results if r["backend"] == "sdpa" and r["batch"] == 1), None)
            if base:
                self.out["best_vs_sdpa_batch1"] = best["images_per_s"] / base["images_per_s"]
            print(
                f"   best: {best['backend']} batch {best['batch']}, {best['images_per_s']:.2f} images/s"
                + (f", x{self.out['best_vs_sdpa_batch1']:.2f} vs sdpa batch 1" if base else ""),
                flush=True,
            )
        print(f"   all finite: {self.out['checks']['all_finite']}; wrote {a.out}", flush=True)
        self.save()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny model: tests the logic anywhere")
    parser.add_argument("--dtype", choices=["float16", "float32"], help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--size", type=int, help="pixels (default 512; 64 with --tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; 2 with --tiny)")
    parser.add_argument("--batches", help="comma list (default 1,4,8; 1,2 with --tiny)")
    parser.add_argument("--backends", default="sdpa,xformers,compile", help="comma list, run in order")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--compile-backend", help="inductor (default on CUDA); eager on CPU: tracing only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="dense fp16 peak, when the name isn't known")
    parser.add_argument("--time-budget-s", type=float, default=330, help="skip what would start later")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads when on CPU")
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.size = args.size or (64 if args.tiny else 512)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,4,8")).split(",")]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "eager")
    if not cuda:
        # One thread: on a shared CPU box another torch process stalls OpenMP barriers (10x+).
        torch.set_num_threads(args.cpu_threads)
    return args


def main() -> None:
    quiet_libraries()
    Bench(parse_args()).run()


if __name__ == "__main__":
    main()
