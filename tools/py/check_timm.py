#!/usr/bin/env python3
"""Checks that an encoder exported with `trainer export --format timm` loads STRICTLY into timm and
gives the same features as our encoder (`trainer features`) on the same images.

    pip install torch timm pillow torchvision
    trainer export   --checkpoint RUN --format timm --out enc.safetensors
    trainer features --checkpoint RUN --shards SHARDS --out feats.safetensors
    python3 tools/py/check_timm.py --weights enc.safetensors --features feats.safetensors --shards SHARDS

The model is `timm.create_model("vit_base_patch16_224", init_values=0.1, num_classes=0)` for a
ViT-B/16 export (the recipe's model) and the same VisionTransformer class at the export's own width,
depth and image size otherwise (micro, tiny, small). Images are read from the shards with the
standard library's tarfile, decoded with Pillow and put through torchvision's test transform
(Resize(r, bicubic) + CenterCrop + ImageNet normalisation, r from the features file's metadata).
Pillow (libjpeg) and zune-jpeg may differ by 1 on a few decoded pixels, so features are compared
with a tolerance; a wrong key mapping (bias order, layer scale, norm) gives differences of order 1.
"""
import argparse
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from safetensors import safe_open


def shard_paths(src):
    p = Path(src)
    if p.is_dir():
        m = json.loads((p / "manifest.json").read_text())
        return [p / s["name"] for s in m["shards"]]
    return [p]


def samples(paths):
    """(key, jpg bytes) in shard order, grouped by key as webdataset does."""
    for path in paths:
        with tarfile.open(path) as tf:
            cur, jpg = None, None
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if key != cur:
                    if cur is not None and jpg is not None:
                        yield cur, jpg
                    cur, jpg = key, None
                if ext == "jpg":
                    jpg = tf.extractfile(m).read()
            if cur is not None and jpg is not None:
                yield cur, jpg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--resize", type=int, help="default: the features file's crop x 8/7 (256 for 224)")
    ap.add_argument("--limit", type=int, default=64)
    a = ap.parse_args()

    import timm
    from timm.models.vision_transformer import VisionTransformer
    from torchvision import transforms as T

    sd = load_file(a.weights)
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n = sd["pos_embed"].shape[1] - 1
    img = int(math.isqrt(n)) * patch
    with safe_open(a.weights, "pt") as f:
        preset = (f.metadata() or {}).get("preset", "")
    heads = {"base": 12, "small": 12, "tiny": 3, "micro": 2}.get(preset) or max(1, dim // 64)
    if (dim, depth, img, patch) == (768, 12, 224, 16):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, init_values=0.1, num_classes=0)
        name = "vit_base_patch16_224"
    else:
        model = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, qkv_bias=True,
                                  init_values=0.1, num_classes=0)
        name = f"VisionTransformer(img {img}, patch {patch}, dim {dim}, depth {depth}, heads {heads})"
    model.load_state_dict(sd, strict=True)
    print(f"{name}: load_state_dict(strict=True) ok ({len(sd)} tensors)")
    model.eval()

    feats = load_file(a.features)
    keys = [bytes(r.tolist()).rstrip(b"\0").decode() for r in feats["keys"].to(torch.uint8)]
    resize = a.resize or -(-img * 8 // 7)
    tf = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    index = {k: i for i, k in enumerate(keys)}
    xs, rows = [], []
    for key, jpg in samples(shard_paths(a.shards)):
        if key not in index:
            continue
        xs.append(tf(Image.open(io.BytesIO(jpg)).convert("RGB")))
        rows.append(index[key])
        if len(xs) >= a.limit:
            break
    x = torch.stack(xs)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [n, 1 + N, D], after the final norm
    cls, mean = tokens[:, 0], tokens[:, 1:].mean(1)
    worst = {}
    for nm, ours, theirs in (("cls", feats["cls"][rows], cls), ("mean", feats["mean"][rows], mean)):
        diff = (ours - theirs).abs()
        cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
        scale = theirs.abs().mean().item()
        print(f"{nm}: {len(rows)} images, max |diff| {diff.max().item():.4g}, mean |diff| {diff.mean().item():.4g} "
              f"(mean |feature| {scale:.3g}), min cosine {cos.min().item():.6f}")
        worst[nm] = cos.min().item()
    ok = all(v > 0.999 for v in worst.values())
    print("SAME FEATURES" if ok else "FEATURES DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
