"""The question ``bench/gpu_check.py`` answers, asked on a GPU machine that has no TensorFlow.

    python3 bench/gpu_proxy_check.py --photos DIR --json gpu_proxy.json          # GPU machine
    .venv/bin/python bench/gpu_proxy_check.py --photos DIR --tf --no-gpu       # here, for --tf

``gpu_check.py`` needs TensorFlow with CUDA. Where a GPU machine has PyTorch and Pillow but no
TensorFlow (and TensorFlow's wheel and CUDA libraries are too big to bring), this measures the
two rates that decide whether petalflow's input pipeline would keep that GPU busy:

1. **The GPU's rate** (when PyTorch sees one; ``--device cpu`` runs it on the CPU): MobileNetV2
   at width ``--alpha`` (0.35) and 224 px, built here in PyTorch with the Keras/TF Hub model's
   layer shapes, random weights (speed does not depend on them), float32 with TF32 allowed (as
   TensorFlow allows by default), channels-last, cuDNN autotuned. Images/s for the backbone's
   uses in petalflow: ``features`` (forward only, batch 256: training's feature pass and
   prediction), the same fed from host memory as uint8 batches (the copy and the conversion
   included), ``frozen`` training steps (backbone forward + a 5-class head, batch 64: what
   gpu_check times as "frozen") and ``fine-tune`` steps (the last three blocks and the final
   convolution trainable, batch 64). This is PyTorch's speed for the architecture, not
   TensorFlow's: only a gap far larger than the two frameworks' difference answers the question.
2. **The input side**: the photos read, decoded and resized to 224 px with Pillow, by one
   process and by one process per core (``--workers``), images/s, page cache warm. With
   ``--tf`` (run where petalflow is installed), petalflow's own input pipeline
   (``inputs.image_dataset``, one worker per core) on the same files beside Pillow with as many
   processes as this machine's cores, so Pillow's rate on the GPU machine translates to
   petalflow's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# MobileNetV2's inverted-residual stages: expansion, channels at width 1.0, repeats, stride.
STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1)]


def divisible(value: float, by: int = 8) -> int:
    """Keras's ``_make_divisible``: channel counts at a width, rounded to multiples of 8."""
    new = max(by, int(value + by / 2) // by * by)
    return new + by if new < 0.9 * value else new


def mobilenet_v2(torch, alpha: float):
    """The backbone as a ``torch.nn.Sequential`` ending in the pooled 1280-wide feature vector."""
    nn = torch.nn

    def conv(i, o, k=1, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(i, o, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(o)]
        return layers + ([nn.ReLU6(inplace=True)] if act else [])

    class Block(nn.Module):
        def __init__(self, i, o, stride, expansion):
            super().__init__()
            hidden = i * expansion
            layers = conv(i, hidden) if expansion != 1 else []
            layers += conv(hidden, hidden, 3, stride, hidden) + conv(hidden, o, act=False)
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and i == o

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    channels = divisible(32 * alpha)
    layers = conv(3, channels, 3, 2)
    for expansion, width, repeats, stride in STAGES:
        out = divisible(width * alpha)
        for j in range(repeats):
            layers.append(Block(channels, out, stride if j == 0 else 1, expansion))
            channels = out
    last = divisible(1280 * alpha) if alpha > 1.0 else 1280
    layers += conv(channels, last) + [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), last


def _rate(step, images: int, seconds: float, sync) -> float:
    """Images/s of ``step`` (``images`` a call) over at least ``seconds``, after warm-up calls."""
    for _ in range(3):
        step()
    sync()
    calls, started = 0, time.perf_counter()
    while True:
        for _ in range(5):
            step()
        calls += 5
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return round(images * calls / elapsed, 1)


def gpu_rates(alpha: float, size: int, device: str, seconds: float) -> dict:
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    backbone, width = mobilenet_v2(torch, alpha)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    head = torch.nn.Linear(width, 5).to(device)
    out = {}

    backbone.eval()
    x = torch.rand(256, 3, size, size, device=device).to(memory_format=torch.channels_last)

    @torch.no_grad()
    def features():
        backbone(x)

    out["features, batch 256"] = _rate(features, 256, seconds, sync)

    pinned = device.startswith("cuda")
    host = torch.randint(0, 256, (256, size, size, 3), dtype=torch.uint8)
    host = host.pin_memory() if pinned else host

    @torch.no_grad()
    def features_fed():
        batch = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        backbone(batch.contiguous(memory_format=torch.channels_last))

    out["features fed from host uint8, batch 256"] = _rate(features_fed, 256, seconds, sync)

    x64 = x[:64].contiguous(memory_format=torch.channels_last)
    y64 = torch.randint(0, 5, (64,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    head_opt = torch.optim.Adam(head.parameters(), 1e-3)

    def frozen():
        with torch.no_grad():
            feats = backbone(x64)
        head_opt.zero_grad(set_to_none=True)
        loss_fn(head(feats), y64).backward()
        head_opt.step()

    out["frozen training step, batch 64"] = _rate(frozen, 64, seconds, sync)

    backbone.train()
    for p in backbone.parameters():
        p.requires_grad_(False)
    top = list(backbone.children())[-8:-2]  # the last three blocks and the final convolution
    trainable = [p for module in top for p in module.parameters()] + list(head.parameters())
    for p in trainable:
        p.requires_grad_(True)
    tune_opt = torch.optim.Adam(trainable, 1e-4)

    def fine_tune():
        tune_opt.zero_grad(set_to_none=True)
        loss_fn(head(backbone(x64)), y64).backward()
        tune_opt.step()

    out["fine-tune training step (top blocks), batch 64"] = _rate(fine_tune, 64, seconds, sync)
    return out


def _pil_load(path: str, size: int = 224) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return len(im.convert("RGB").resize((size, size), Image.BILINEAR).tobytes())


def pil_rates(paths: list[str], workers: list[int], passes: int) -> dict:
    from multiprocessing import Pool

    for path in paths:  # page cache warm, as for the TensorFlow side
        Path(path).read_bytes()
    out = {}
    for n in workers:
        with Pool(n) as pool:
            pool.map(_pil_load, paths[: n * 4], chunksize=1)  # workers started and warm
            started = time.perf_counter()
            for _ in range(passes):
                pool.map(_pil_load, paths, chunksize=8)
            out[f"Pillow, {n} process{'es' if n > 1 else ''}"] = round(
                len(paths) * passes / (time.perf_counter() - started), 1)
    return out


def tf_rate(paths: list[str], passes: int) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from petalflow.tasks.inputs import image_dataset

    def one_pass():
        return sum(int(b.shape[0]) for b in image_dataset(paths, None, 224, 32))

    one_pass()  # tracing, page cache
    started = time.perf_counter()
    n = sum(one_pass() for _ in range(passes))
    return round(n / (time.perf_counter() - started), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    ap.add_argument("--limit", type=int, default=600)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.35)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=3.0, help="least time per GPU figure")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when seen)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the model's rates")
    ap.add_argument("--workers", default=None, help="process counts for Pillow, e.g. 1,8,16")
    ap.add_argument("--tf", action="store_true", help="also petalflow's own input pipeline")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    paths = sorted(str(p) for p in Path(args.photos).rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)[: args.limit]
    cores = os.cpu_count() or 1
    report = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "machine": {"processor": platform.processor() or platform.machine(),
                          "cores": cores, "python": platform.python_version()},
              "photos": len(paths)}
    try:
        import tensorflow  # noqa: F401
        report["tensorflow"] = "importable"
    except ImportError as exc:
        report["tensorflow"] = f"not importable: {exc}"
    if not args.no_gpu:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        report["torch"] = torch.__version__
        report["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        report["model_images_per_s"] = gpu_rates(args.alpha, args.image_size, device, args.seconds)
    workers = ([int(w) for w in args.workers.split(",")] if args.workers
               else sorted({1, cores}))
    report["input_images_per_s"] = pil_rates(paths, workers, args.passes)
    if args.tf:
        report["input_images_per_s"]["petalflow inputs.image_dataset"] = tf_rate(paths, args.passes)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
