"""Forward throughput (Mpx/s) of the registered models, per batch size.

PAD (small preset) on square tiles, and dense S²Fin on tiles whose output is
``--s2fin-tile`` px square (input + P-1). Each figure comes with a reference
measured in the same run:
- PAD: one ConvNeXt-V2 encoder of the same preset alone on the optical input
  (the ratio is the cost of the second encoder, the PAD blocks and UPerNet);
- S²Fin: the patch classifier on the same patches, cut beforehand (the ratio is
  the cost of the dense adapter: unfold, sub-batching, reassembly).

    python benchmarks/bench_models.py                      # CPU, float32
    python benchmarks/bench_models.py --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from tilefuse.models.convnext import ConvNeXt
from tilefuse.models.pad import PRESETS
from tilefuse.models.s2fin import unfold_patches
from tilefuse.tile_model import build_model


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="PAD batch sizes")
    parser.add_argument("--s2fin-batch-sizes", default="1,4,16", help="S²Fin batch sizes (dense S²Fin is slow on CPU)")
    parser.add_argument("--pad-preset", default="atto", choices=list(PRESETS))
    parser.add_argument("--pad-size", type=int, default=512)
    parser.add_argument("--s2fin-tile", type=int, default=16, help="output pixels per side of an S²Fin tile")
    parser.add_argument("--max-patches", type=int, default=None, help="S²Fin sub-batch size (patches) [the model's default]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--only", choices=["pad", "s2fin"], default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    print(
        f"device={device} amp={args.amp} channels_last={args.channels_last} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    def prepare(module):
        return module.to(device, memory_format=memory_format).eval()

    def tensor(*shape):
        return torch.randn(*shape, device=device).contiguous(memory_format=memory_format)

    if args.only in (None, "pad"):
        modalities = {"optical": 3, "sar": 1}
        model = prepare(build_model("pad", modalities, 7, preset=args.pad_preset))
        encoder = prepare(ConvNeXt.from_preset(PRESETS[args.pad_preset].encoder, 3))
        size = args.pad_size
        print(f"\nPAD preset={args.pad_preset} ({model.num_parameters() / 1e6:.1f} M params), tiles {size}x{size}")
        print(f"{'batch':>5} {'Mpx/s':>8} {'encoder Mpx/s':>14} {'PAD/encoder':>12}")
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            inputs = {name: tensor(batch, bands, size, size) for name, bands in modalities.items()}
            with torch.inference_mode(), autocast:
                t_model = best_time(lambda: model(inputs), device, args.repeats)
                t_encoder = best_time(lambda: encoder(inputs["optical"]), device, args.repeats)
            pixels = batch * size * size / 1e6
            print(f"{batch:>5} {pixels / t_model:>8.3f} {pixels / t_encoder:>14.3f} {t_encoder / t_model:>12.2f}")

    if args.only in (None, "s2fin"):
        modalities = {"optical": 12, "sar": 2}
        sizes = {} if args.max_patches is None else {"max_patches_per_batch": args.max_patches}
        model = prepare(build_model("s2fin", modalities, 10, **sizes))
        p, tile, chunk = model.patch_size, args.s2fin_tile, model.max_patches_per_batch
        print(
            f"\nS²Fin dense ({model.num_parameters() / 1e6:.2f} M params, P={p}), output tiles {tile}x{tile} "
            f"(inputs {tile + p - 1}x{tile + p - 1}), sub-batches of {chunk} patches"
        )
        print(f"{'batch':>5} {'Mpx/s':>8} {'patches Mpx/s':>14} {'dense/patches':>14}")
        for batch in [int(b) for b in args.s2fin_batch_sizes.split(",")]:
            inputs = {name: tensor(batch, bands, tile + p - 1, tile + p - 1) for name, bands in modalities.items()}
            optical, sar = (unfold_patches(inputs[n], p) for n in modalities)
            chunks = [
                (optical[i : i + chunk], sar[i : i + chunk])
                for i in range(0, optical.shape[0], chunk)
            ]
            with torch.inference_mode(), autocast:
                t_model = best_time(lambda: model(inputs), device, args.repeats)
                t_patches = best_time(lambda: [model.classifier(o, s) for o, s in chunks], device, args.repeats)
            pixels = batch * tile * tile / 1e6
            print(f"{batch:>5} {pixels / t_model:>8.4f} {pixels / t_patches:>14.4f} {t_patches / t_model:>14.2f}")


if __name__ == "__main__":
    main()
