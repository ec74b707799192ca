"""bench/: each benchmark runs in a tiny configuration, so it cannot rot."""

import subprocess
import sys

from scriptrun import ROOT


def test_augmentation_throughput_tiny():
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--device", "cpu", "--batch-size", "4", "--repeats", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "images/s" not in line and "---" not in line]
    assert [line.split("|")[1].strip() for line in table] == [
        "weak_augment", "strong_augment", "PIL weak: flip + crop(pad 4, reflect)", "PIL strong: weak + RandAugment(num_ops=3)"]
    assert all(float(line.split("|")[3].replace(",", "")) > 0 for line in table)
