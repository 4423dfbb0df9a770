#!/usr/bin/env python3
"""Interoperability check: read our shards with the Python `webdataset` library.

    pip install webdataset pillow
    python3 tools/py/check_webdataset.py data/shards

Opens every shard listed in DIR/manifest.json with `webdataset.WebDataset(urls).decode("pil")`
and checks, for every sample, that
  - the key, class index and metadata are there and agree with classes.txt,
  - the image decodes with PIL to the size recorded in `key.json`,
  - the image bytes are the bytes our own reader sees (first member of the tar with that key),
and that the number of samples equals the manifest's total. Exits non-zero on any mismatch.
"""
import io
import json
import sys
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    root = Path(sys.argv[1])
    manifest = json.loads((root / "manifest.json").read_text())
    classes = (root / "classes.txt").read_text().split("\n")
    urls = [str(root / s["name"]) for s in manifest["shards"]]

    # Independent reference: the standard library's tarfile.
    raw = {}
    for u in urls:
        with tarfile.open(u) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                raw.setdefault(key, {})[ext] = tf.extractfile(m).read()

    n = 0
    problems = []
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    for sample in ds:
        n += 1
        key = sample["__key__"]
        img, cls, meta = sample["jpg"], sample["cls"], sample["json"]
        if not isinstance(img, Image.Image):
            problems.append(f"{key}: jpg did not decode to a PIL image")
            continue
        if (img.width, img.height) != (meta["width"], meta["height"]):
            problems.append(f"{key}: PIL size {img.size} != json {meta['width']}x{meta['height']}")
        if classes[int(cls)] != meta["class"]:
            problems.append(f"{key}: cls {cls} -> {classes[int(cls)]} but json class is {meta['class']}")
        ref = Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB")
        if ref.tobytes() != img.convert("RGB").tobytes():
            problems.append(f"{key}: pixels differ from the tarfile reference")
    if n != manifest["total_samples"]:
        problems.append(f"read {n} samples, manifest says {manifest['total_samples']}")
    for p in problems[:20]:
        print("PROBLEM:", p)
    print(f"{n} samples from {len(urls)} shards read with webdataset {wds.__version__ if hasattr(wds, '__version__') else ''}: "
          + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
