"""Throughput of the batched on-device augmentation against the per-image PIL pipeline of the
public SSL code (torchvision transforms on PIL images, one process, as a DataLoader worker runs it).

    python bench/throughput.py --device cpu --batch-size 448 --repeats 10

Prints a markdown table: images/s (median over --repeats timed batches, after one warm-up batch)
with the machine, the library versions and the command line.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import strong_augment, weak_augment  # noqa: E402


def _median_seconds(fn, repeats, device):
    """Median wall time of fn() over `repeats` calls, after one untimed warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def augmentation_throughput(device, batch_size=448, repeats=10, seed=0):
    """Rows (pipeline, where it runs, images/s) for weak and strong augmentation of a batch of random
    uint8 CIFAR-sized images: batched on `device`, and per image with PIL (numpy array ->
    Image.fromarray -> transforms -> PILToTensor, then torch.stack as the collate step)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    arrays = list(x.cpu().permute(0, 2, 3, 1).numpy())  # HWC uint8, as the datasets store them
    weak_pil = [T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4, padding_mode="reflect")]
    pipelines = {
        "PIL weak: flip + crop(pad 4, reflect)": T.Compose([*weak_pil, T.PILToTensor()]),
        "PIL strong: weak + RandAugment(num_ops=3)":
            T.Compose([*weak_pil, T.RandAugment(num_ops=3), T.PILToTensor()]),
    }

    def per_image(transform):
        return lambda: torch.stack([transform(Image.fromarray(a)) for a in arrays])

    batched = f"{device.type}, batched"
    rows = [("weak_augment", batched, lambda: weak_augment(x), device),
            ("strong_augment", batched, lambda: strong_augment(x), device)]
    rows += [(name, "cpu, per image, 1 process", per_image(t), torch.device("cpu"))
             for name, t in pipelines.items()]
    return [(name, runs_on, batch_size / _median_seconds(fn, repeats, dev))
            for name, runs_on, fn, dev in rows]


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(device):
    """Markdown lines describing the machine, the versions and the command."""
    device = torch.device(device)
    lines = [f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, "
             f"torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    lines.append(f"- torch {torch.__version__}, torchvision {torchvision.__version__}, "
                 f"Python {platform.python_version()}")
    lines.append(f"- command: `python {' '.join(sys.argv)}`")
    return lines


def markdown_table(rows):
    out = ["| pipeline | runs on | images/s |", "| --- | --- | ---: |"]
    out += [f"| {name} | {where} | {rate:,.0f} |" for name, where, rate in rows]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=448, help="images per timed batch")
    p.add_argument("--repeats", type=int, default=10, help="timed batches (median reported)")
    args = p.parse_args()
    rows = augmentation_throughput(args.device, args.batch_size, args.repeats)
    print("\n".join(machine_lines(args.device) + [""] + markdown_table(rows)))


if __name__ == "__main__":
    main()
