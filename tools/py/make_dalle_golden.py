#!/usr/bin/env python3
"""Golden files for loading the DALL-E tokenizer from a PyTorch `.pth` (spec §3).

    python3 -m venv venv && venv/bin/pip install torch numpy && venv/bin/pip install --no-deps dall-e
    venv/bin/python tools/py/make_dalle_golden.py trainer/tests/golden

Builds the reference implementation (OpenAI's `dall_e.Encoder`) at the micro size of spec §7 B
(n_hid 64, vocab 512, its own random init, seed 0), saves its `state_dict()` with `torch.save`
(the same container and key names as `cae_ckpt/dalle_encoder.pth`: `blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.w`, ...), runs it in f32 on the CPU on two 32x32 inputs
defined by integer formulas (so the Rust test builds the same pixels), and writes the token ids
(argmax over channels, raster order) and all logits (`dalle_micro_logits.f32`,
little-endian f32, (2, 512, 4, 4)) next to `dalle_micro.json`.
"""
import json
import sys
from pathlib import Path

import torch
from dall_e.encoder import Encoder
from dall_e.utils import map_pixels

S = 32


def image(b):
    """uint8 pixels of test image b, HWC -> float [0,1] CHW."""
    px = [[[((x * (7 + 5 * b) + y * (3 + b) + c * 50) * (1 + (x ^ y) % 3)) % 256 for c in range(3)]
           for x in range(S)] for y in range(S)]
    return torch.tensor(px, dtype=torch.float32).permute(2, 0, 1) / 255.0


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/golden")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    enc = Encoder(n_hid=64, vocab_size=512, requires_grad=False, device=torch.device("cpu"),
                  use_mixed_precision=False)
    enc.eval()
    x = torch.stack([image(0), image(1)])
    with torch.no_grad():
        logits = enc(map_pixels(x))  # (2, 512, 4, 4)
    tokens = logits.argmax(1).reshape(2, -1)
    top2 = logits.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    torch.save(enc.state_dict(), out / "dalle_micro.pth")
    # all logits, little-endian f32, shape (2, 512, 4, 4) row-major
    (out / "dalle_micro_logits.f32").write_bytes(logits.contiguous().numpy().astype("<f4").tobytes())
    margins = (top2[:, 0] - top2[:, 1]).reshape(2, -1)
    (out / "dalle_micro.json").write_text(json.dumps({
        "n_hid": 64, "vocab_size": 512, "size": S,
        "tokens": tokens.tolist(),
        "top2_margins": margins.tolist(),
        "logits_b0_cell0_first8": logits[0, :8, 0, 0].tolist(),
        "min_top2_margin": margin,
        "torch": torch.__version__,
        "keys": sorted(enc.state_dict().keys())[:5],
    }, indent=1) + "\n")
    print("tokens", tokens.tolist(), "min margin", margin)


if __name__ == "__main__":
    main()
