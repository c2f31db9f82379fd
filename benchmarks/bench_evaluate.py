"""Evaluation throughput: images per second through the FID Inception, and the cost of the metrics.

    python benchmarks/bench_evaluate.py --device cuda --batch-sizes 64 256 --image-sizes 256 512 --num-images 2048
    python benchmarks/bench_evaluate.py            # a quick CPU run

Without --inception-weights the network gets random weights in the published layout: throughput
does not depend on the values, and no download is needed. Every image is resized to 299x299 inside
the network, so the input resolution matters only for the resize and the host-to-device copy.
Numbers are for the device printed in the table; a CPU row says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from fastdit.evaluate import InceptionFeatureExtractor, compute_statistics, frechet_distance
from fastdit.evaluate.inception import InceptionV3, load_inception, load_inception_weights, random_inception_state_dict


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--num-images", type=int, default=64, help="images timed per configuration")
    parser.add_argument("--inception-weights", help="real weights (default: random, same speed)")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.inception_weights:
        model = load_inception(args.inception_weights, device=device)
    else:
        model = load_inception_weights(InceptionV3(), random_inception_state_dict()).to(device)
    rng = np.random.default_rng(0)
    if device.type == "cuda":
        print(f"device: {device} ({torch.cuda.get_device_name(device)})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})")
    print(f"{'input':>9} {'batch':>6} {'images':>7} {'seconds':>8} {'images/s':>9} {'ms/image':>9}")
    for image_size in args.image_sizes:
        for batch_size in args.batch_sizes:
            extractor = InceptionFeatureExtractor(model=model, device=device, batch_size=batch_size)
            images = rng.integers(0, 256, (args.num_images, image_size, image_size, 3), dtype=np.uint8)
            extractor(images[:batch_size])  # warm-up: allocator, cuDNN algorithm choice
            synchronize(device)
            start = time.perf_counter()
            batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
            compute_statistics(batches, extractor)  # the whole path: network, float64 moments, IS, P/R subset
            synchronize(device)
            seconds = time.perf_counter() - start
            rate = args.num_images / seconds
            size = f"{image_size}x{image_size}"
            print(f"{size:>9} {batch_size:>6} {args.num_images:>7} {seconds:>8.2f} {rate:>9.1f} {1000 / rate:>9.1f}")

    # The metric math at full size (2048-dim pool_3): independent of the number of images.
    features = rng.standard_normal((4096, 2048))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    start = time.perf_counter()
    frechet_distance(mu, sigma, mu + 0.1, sigma * 1.1)
    print(f"Frechet distance, 2048 dims, float64 on the CPU: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
