#!/usr/bin/env python3
"""Golden outputs for the two-view resize, computed with Pillow (the reference's resampler).

    pip install pillow
    python3 tools/py/make_resize_golden.py pipeline/tests/golden

The source image is defined by integer formulas (so the Rust test builds the same pixels), the
crop box is fixed, and the views are made as torchvision's `F.resized_crop` makes them for CAE
(spec §1 step 3): crop, then resize to 224x224 BICUBIC and to 112x112 LANCZOS. Raw RGB bytes
(HWC) are written, plus the box, into `resize_golden.json` / `*.rgb`.

With torchvision installed it also writes the evaluation transform (spec §5 test transform,
`trainer features`): `Resize(r, BICUBIC)` + `CenterCrop(224)` on the same image, for r = 256
and r = 224 (`eval_*.rgb`, cases under "eval").
"""
import json
import sys
from pathlib import Path

from PIL import Image

W, H = 300, 200
BOXES = [  # (top, left, height, width): a downscale, an upscale, and a non-square crop
    (30, 50, 150, 240),
    (60, 90, 70, 60),
    (0, 0, 200, 300),
]


def pixel(x, y):
    r = (x * 255) // (W - 1)
    g = (y * 255) // (H - 1)
    b = 20 + 200 * (((x // 8) + (y // 8)) % 2)
    return r, g, (b + (x * y) % 23) % 256


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "pipeline/tests/golden")
    out.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (W, H))
    img.putdata([pixel(x, y) for y in range(H) for x in range(W)])
    cases = []
    for n, (top, left, h, w) in enumerate(BOXES):
        crop = img.crop((left, top, left + w, top + h))
        v224 = crop.resize((224, 224), Image.BICUBIC)
        v112 = crop.resize((112, 112), Image.LANCZOS)
        (out / f"resize_{n}_224.rgb").write_bytes(v224.tobytes())
        (out / f"resize_{n}_112.rgb").write_bytes(v112.tobytes())
        cases.append({"top": top, "left": left, "height": h, "width": w,
                      "view": f"resize_{n}_224.rgb", "token": f"resize_{n}_112.rgb"})
    evals = []
    try:
        from torchvision import transforms as T
    except ImportError:
        T = None
        print("torchvision not installed: no eval cases", file=sys.stderr)
    if T is not None:
        for r in (256, 224):
            t = T.Compose([T.Resize(r, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
            name = f"eval_{r}.rgb"
            (out / name).write_bytes(t(img).tobytes())
            evals.append({"resize": r, "crop": 224, "image": name})
    (out / "resize_golden.json").write_text(json.dumps({"width": W, "height": H, "cases": cases, "eval": evals,
                                                        "pillow": Image.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
