#!/usr/bin/env python3
"""Golden files for importing an mmselfsup 0.x CAE pre-train checkpoint (spec §2.1-§2.4, §5).

    python3 -m venv venv && venv/bin/pip install torch numpy
    venv/bin/python tools/py/make_mmselfsup_golden.py trainer/tests/golden

Needs only torch (no mmcv / mmcls / mmselfsup). It builds, at the `micro` size of spec §7 B
(img 64, patch 16 -> 4x4 grid, D 64, depth 2, 2 heads, MLP 256, regressor 1, decoder 1, vocab 512,
6 masks), a state_dict with the exact key names, shapes, order and container of an mmselfsup 0.x
`CAE` checkpoint, filled with seeded random values (pos_embed is the real 2-D sin-cos table):

  backbone.*  CAEViT (MS0 backbones/cae_vit.py; layers = utils/transformer_blocks.py
              TransformerEncoderLayer + MultiheadAttention with q_bias/v_bias, no qkv.bias)
  teacher.*   same names; values = backbone + small noise, so a loader that reads the teacher
              into the encoder is caught
  neck.*      CAENeck (necks/cae_neck.py): mask_token, regressors.i.*, decoders.i.*,
              norm_regressor, norm_decoder, head
  head.encoder.blocks.*  the DALL-E tokenizer held by CAEHead. Only a SUBSET of its tensors is
              written (input conv, group_1.block_1, group_2.block_1.id_path) to keep the file
              small; an importer must ignore `head.*` anyway (the tokenizer comes from
              dalle_encoder.pth).

Decoder attention layout: mmselfsup v0.9.0 (the release the 2022-04-27 checkpoint was trained
with) stores `neck.decoders.i.attn.{q_bias, v_bias}` and no `attn.qkv.bias`; 0.x HEAD (since
commit 249b7db3, v0.9.1) stores a full `neck.decoders.i.attn.qkv.bias` (3D: q | k | v) instead.
Both are written (the k part of the HEAD variant is random: it cancels in the softmax).

Files (all under the output dir):
  cae_mmselfsup_micro_legacy.pth          {meta, state_dict}, v0.9.0 layout, legacy pickle
                                          (`_use_new_zipfile_serialization=False`, as
                                          tools/model_converters/publish_model.py writes)
  cae_mmselfsup_micro_qkvbias_legacy.pth  {meta, state_dict}, 0.x-HEAD decoder layout, legacy
  cae_mmselfsup_micro_backbone_legacy.pth {state_dict, author}: backbone only, `backbone.` prefix
                                          stripped (tools/model_converters/
                                          extract_backbone_weights.py then publish_model.py;
                                          the form mmselfsup's released model files have)
  cae_mmselfsup_micro_<name>.f32          little-endian f32, row-major, shapes in the json
  cae_mmselfsup_micro.json                config, mask, shapes, key table, provenance

Reference outputs are computed by an independent pure-torch re-implementation of the spec's
formulas in float64 from the stored f32 weights (then rounded to f32):
  input         [1, 3, 64, 64]  seeded N(0,1): an already-normalised image
  encoder_out   [1, 17, 64]     encoder on all 16 patches (no mask): cls + 16 tokens, after ln1
  x_unmasked    [1, 11, 64]     encoder on the 10 visible patches (cls first)
  latent_target [1, 6, 64]      teacher on the 6 masked patches, cls dropped
  latent_pred   [1, 6, 64]      regressor output after norm_regressor
  logits        [1, 6, 512]     decoder + norm_decoder + head
"""
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch

# ---- micro preset (trainer/src/model/config.rs `CaeConfig::micro`, spec §7 B) ----
IMG, PATCH, D, DEPTH, HEADS, MLP = 64, 16, 64, 2, 2, 256
REG_DEPTH, DEC_DEPTH, VOCAB, EPS = 1, 1, 512, 1e-6
GRID = IMG // PATCH
N = GRID * GRID
DALLE_HID = 64  # DalleConfig::micro n_hid
# masked patch indices (raster order, ascending): a 3x2 block, rows 0-2, cols 1-2
MASKED = [1, 2, 5, 6, 9, 10]
PREFIX = "cae_mmselfsup_micro"


def sincos_pos_embed(grid, dim, temperature=10000.0):
    """Copy of MS0 mmselfsup/models/utils/position_embedding.py (cls_token=True)."""
    grid_w = torch.arange(grid, dtype=torch.float32)
    grid_h = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature ** omega)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pe = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), pe], dim=1)


class Gen:
    """Seeded tensor factory with sensible magnitudes (values matter, init scheme does not)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, shape, std, mean=0.0):
        return (torch.randn(*shape, generator=self.g) * std + mean).float()

    def uniform(self, shape, lo, hi):
        return (torch.rand(*shape, generator=self.g) * (hi - lo) + lo).float()

    def linear_w(self, out_f, in_f):
        return self.normal((out_f, in_f), 1.0 / math.sqrt(in_f))

    def ln(self, sd, name):
        sd[f"{name}.weight"] = self.normal((D,), 0.1, 1.0)
        sd[f"{name}.bias"] = self.normal((D,), 0.05)

    def gamma(self):
        return self.uniform((D,), 0.05, 0.4)


def vit_layer(gen, sd, p, qkv_full_bias=False):
    """mmselfsup TransformerEncoderLayer, state_dict order: own params, then ln1, attn, ln2, ffn."""
    sd[f"{p}.gamma_1"] = gen.gamma()
    sd[f"{p}.gamma_2"] = gen.gamma()
    gen.ln(sd, f"{p}.ln1")
    # k_bias is always drawn so both layouts share every other value
    q_bias, k_bias, v_bias = gen.normal((D,), 0.1), gen.normal((D,), 0.1), gen.normal((D,), 0.1)
    if not qkv_full_bias:  # v0.9.0 semantics (and the 0.x-HEAD backbone with qkv_bias=False)
        sd[f"{p}.attn.q_bias"] = q_bias
        sd[f"{p}.attn.v_bias"] = v_bias
    sd[f"{p}.attn.qkv.weight"] = gen.linear_w(3 * D, D)
    if qkv_full_bias:  # 0.x HEAD decoder (qkv_bias=True): one 3D bias, k part included
        sd[f"{p}.attn.qkv.bias"] = torch.cat([q_bias, k_bias, v_bias])
    sd[f"{p}.attn.proj.weight"] = gen.linear_w(D, D)
    sd[f"{p}.attn.proj.bias"] = gen.normal((D,), 0.02)
    gen.ln(sd, f"{p}.ln2")
    sd[f"{p}.ffn.layers.0.0.weight"] = gen.linear_w(MLP, D)
    sd[f"{p}.ffn.layers.0.0.bias"] = gen.normal((MLP,), 0.02)
    sd[f"{p}.ffn.layers.1.weight"] = gen.linear_w(D, MLP)
    sd[f"{p}.ffn.layers.1.bias"] = gen.normal((D,), 0.02)


def backbone(gen, prefix):
    sd = OrderedDict()
    sd[f"{prefix}.cls_token"] = gen.normal((1, 1, D), 0.5)
    sd[f"{prefix}.pos_embed"] = sincos_pos_embed(GRID, D)
    sd[f"{prefix}.patch_embed.projection.weight"] = gen.normal((D, 3, PATCH, PATCH), 1.0 / math.sqrt(3 * PATCH * PATCH))
    sd[f"{prefix}.patch_embed.projection.bias"] = gen.normal((D,), 0.02)
    for i in range(DEPTH):
        vit_layer(gen, sd, f"{prefix}.layers.{i}")
    gen.ln(sd, f"{prefix}.ln1")
    return sd


def neck(gen, qkv_full_bias):
    sd = OrderedDict()
    sd["neck.mask_token"] = gen.normal((1, 1, D), 0.5)
    for i in range(REG_DEPTH):
        p = f"neck.regressors.{i}"
        sd[f"{p}.gamma_1_cross"] = gen.gamma()
        sd[f"{p}.gamma_2_cross"] = gen.gamma()
        for n in ("norm1_q_cross", "norm1_k_cross", "norm1_v_cross", "norm2_cross"):
            gen.ln(sd, f"{p}.{n}")
        sd[f"{p}.cross_attn.q_bias"] = gen.normal((D,), 0.1)
        sd[f"{p}.cross_attn.v_bias"] = gen.normal((D,), 0.1)
        for n in ("q", "k", "v"):
            sd[f"{p}.cross_attn.{n}.weight"] = gen.linear_w(D, D)
        sd[f"{p}.cross_attn.proj.weight"] = gen.linear_w(D, D)
        sd[f"{p}.cross_attn.proj.bias"] = gen.normal((D,), 0.02)
        sd[f"{p}.ffn.layers.0.0.weight"] = gen.linear_w(MLP, D)
        sd[f"{p}.ffn.layers.0.0.bias"] = gen.normal((MLP,), 0.02)
        sd[f"{p}.ffn.layers.1.weight"] = gen.linear_w(D, MLP)
        sd[f"{p}.ffn.layers.1.bias"] = gen.normal((D,), 0.02)
    for i in range(DEC_DEPTH):
        vit_layer(gen, sd, f"neck.decoders.{i}", qkv_full_bias=qkv_full_bias)
    gen.ln(sd, "neck.norm_regressor")
    gen.ln(sd, "neck.norm_decoder")
    sd["neck.head.weight"] = gen.linear_w(VOCAB, D)
    sd["neck.head.bias"] = gen.normal((VOCAB,), 0.02)
    return sd


def dalle_subset(gen):
    """A few `head.encoder.blocks.*` tensors of the micro DALL-E (n_hid 64), real names/shapes."""
    sd = OrderedDict()

    def conv(name, n_out, n_in, kw):
        sd[f"head.encoder.blocks.{name}.w"] = gen.normal((n_out, n_in, kw, kw), 1.0 / math.sqrt(n_in * kw * kw))
        sd[f"head.encoder.blocks.{name}.b"] = torch.zeros(n_out)

    h = DALLE_HID
    conv("input", h, 3, 7)
    blk, hid = "group_1.block_1", h // 4
    conv(f"{blk}.res_path.conv_1", hid, h, 3)
    conv(f"{blk}.res_path.conv_2", hid, hid, 3)
    conv(f"{blk}.res_path.conv_3", hid, hid, 3)
    conv(f"{blk}.res_path.conv_4", h, hid, 1)
    conv("group_2.block_1.id_path", 2 * h, h, 1)
    return sd


def with_metadata(sd):
    """Attach `_metadata` like nn.Module.state_dict / mmcv get_state_dict (pickled via BUILD)."""
    out = OrderedDict(sd)
    prefixes = OrderedDict([("", {"version": 1})])
    for k in sd:
        parts = k.split(".")[:-1]
        for j in range(1, len(parts) + 1):
            prefixes.setdefault(".".join(parts[:j]), {"version": 1})
    out._metadata = prefixes
    return out


def meta():
    """What mmcv's runner + mmselfsup tools/train.py put in `meta` (strings, ints, dicts, floats)."""
    return {
        "env_info": "sys.platform: linux\nPython: 3.8\nPyTorch: 1.10.0\nMMCV: 1.4.8",
        "config": "model = dict(type='CAE', backbone=dict(type='CAEViT', arch='b'))  # micro golden",
        "seed": 1234,
        "exp_name": "cae_vit-base-p16_16xb256-coslr-300e_in1k-224.py",
        "mmcv_version": "1.4.8",
        "time": "Wed Apr 27 12:00:00 2022",
        "epoch": 300,
        "iter": 187800,
        "hook_msgs": {"last_ckpt": "work_dirs/cae/epoch_300.pth"},
        "fp16": {"loss_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                 "growth_interval": 2000, "_growth_tracker": 17}},
        "list_value": [1, 2, "three", 4.5, None, True],
    }


# ---------------- independent forward (spec §2.1, §2.3, §2.4), float64 ----------------

def ln(x, sd, p):
    return torch.nn.functional.layer_norm(x, (D,), sd[f"{p}.weight"], sd[f"{p}.bias"], EPS)


def heads(x):  # [B, T, D] -> [B, H, T, hd]
    b, t, _ = x.shape
    return x.reshape(b, t, HEADS, D // HEADS).permute(0, 2, 1, 3)


def attend(q, k, v):
    scale = (D // HEADS) ** -0.5
    a = torch.softmax(heads(q) @ heads(k).transpose(-2, -1) * scale, dim=-1)
    o = a @ heads(v)  # [B, H, Tq, hd]
    b, _, t, _ = o.shape
    return o.permute(0, 2, 1, 3).reshape(b, t, D)


def ffn(x, sd, p):
    h = x @ sd[f"{p}.ffn.layers.0.0.weight"].T + sd[f"{p}.ffn.layers.0.0.bias"]
    h = torch.nn.functional.gelu(h)  # exact erf GELU
    return h @ sd[f"{p}.ffn.layers.1.weight"].T + sd[f"{p}.ffn.layers.1.bias"]


def block(x, sd, p):
    h = ln(x, sd, f"{p}.ln1")
    w = sd[f"{p}.attn.qkv.weight"]
    if f"{p}.attn.qkv.bias" in sd:
        bias = sd[f"{p}.attn.qkv.bias"]
    else:
        bias = torch.cat([sd[f"{p}.attn.q_bias"], torch.zeros_like(sd[f"{p}.attn.v_bias"]), sd[f"{p}.attn.v_bias"]])
    qkv = h @ w.T + bias
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    o = attend(q, k, v) @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"]
    x = x + sd[f"{p}.gamma_1"] * o
    x = x + sd[f"{p}.gamma_2"] * ffn(ln(x, sd, f"{p}.ln2"), sd, p)
    return x


def encoder(img, sd, p, keep):
    """CAEViT.forward on the patches `keep` (ascending raster indices): [1, 1 + len(keep), D]."""
    x = torch.nn.functional.conv2d(img, sd[f"{p}.patch_embed.projection.weight"],
                                   sd[f"{p}.patch_embed.projection.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # [B, N, D]
    pos = sd[f"{p}.pos_embed"]  # [1, 1 + N, D]
    idx = torch.tensor(keep)
    x = torch.cat([sd[f"{p}.cls_token"].expand(x.shape[0], -1, -1), x[:, idx]], dim=1)
    x = x + torch.cat([pos[:, :1], pos[:, 1:][:, idx]], dim=1)
    for i in range(DEPTH):
        x = block(x, sd, f"{p}.layers.{i}")
    return ln(x, sd, f"{p}.ln1")


def neck_forward(x_vis, sd, visible, masked):
    pos = sd["backbone.pos_embed"][:, 1:]
    p_v, p_m = pos[:, torch.tensor(visible)], pos[:, torch.tensor(masked)]
    q = sd["neck.mask_token"].expand(x_vis.shape[0], len(masked), D)
    for i in range(REG_DEPTH):
        p = f"neck.regressors.{i}"
        kv = torch.cat([x_vis, q], dim=1)
        p_kv = torch.cat([p_v, p_m], dim=1)
        qq = ln(q + p_m, sd, f"{p}.norm1_q_cross") @ sd[f"{p}.cross_attn.q.weight"].T + sd[f"{p}.cross_attn.q_bias"]
        kk = ln(kv + p_kv, sd, f"{p}.norm1_k_cross") @ sd[f"{p}.cross_attn.k.weight"].T
        vv = ln(kv, sd, f"{p}.norm1_v_cross") @ sd[f"{p}.cross_attn.v.weight"].T + sd[f"{p}.cross_attn.v_bias"]
        o = attend(qq, kk, vv) @ sd[f"{p}.cross_attn.proj.weight"].T + sd[f"{p}.cross_attn.proj.bias"]
        x = q + sd[f"{p}.gamma_1_cross"] * o
        x = ln(x, sd, f"{p}.norm2_cross")
        q = x + sd[f"{p}.gamma_2_cross"] * ffn(x, sd, p)
    latent_pred = ln(q, sd, "neck.norm_regressor")
    y = latent_pred + p_m
    for i in range(DEC_DEPTH):
        y = block(y, sd, f"neck.decoders.{i}")
    y = ln(y, sd, "neck.norm_decoder")
    return latent_pred, y @ sd["neck.head.weight"].T + sd["neck.head.bias"]


def run_all(sd32, img):
    sd = {k: v.double() for k, v in sd32.items()}
    x = img.double()
    visible = [i for i in range(N) if i not in MASKED]
    out = OrderedDict()
    out["encoder_out"] = encoder(x, sd, "backbone", list(range(N)))
    out["x_unmasked"] = encoder(x, sd, "backbone", visible)
    out["latent_target"] = encoder(x, sd, "teacher", MASKED)[:, 1:]
    out["latent_pred"], out["logits"] = neck_forward(out["x_unmasked"][:, 1:], sd, visible, MASKED)
    return out


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/golden")
    out_dir.mkdir(parents=True, exist_ok=True)

    gen = Gen(20220427)
    bb = backbone(gen, "backbone")
    noise = Gen(7)
    teacher = OrderedDict(
        (k.replace("backbone.", "teacher.", 1), v if k.endswith("pos_embed") else v + noise.normal(v.shape, 0.01))
        for k, v in bb.items())
    # the neck is drawn once; the two decoder layouts share every value except the extra k bias
    nk_v09 = neck(Gen(99), qkv_full_bias=False)
    nk_head = neck(Gen(99), qkv_full_bias=True)
    head = dalle_subset(Gen(5))

    sd_v09 = OrderedDict(list(bb.items()) + list(teacher.items()) + list(nk_v09.items()) + list(head.items()))
    sd_head = OrderedDict(list(bb.items()) + list(teacher.items()) + list(nk_head.items()) + list(head.items()))

    torch.save({"meta": meta(), "state_dict": with_metadata(sd_v09)}, out_dir / f"{PREFIX}_legacy.pth",
               _use_new_zipfile_serialization=False)
    torch.save({"meta": meta(), "state_dict": with_metadata(sd_head)}, out_dir / f"{PREFIX}_qkvbias_legacy.pth",
               _use_new_zipfile_serialization=False)
    extracted = {"state_dict": {k[len("backbone."):]: v for k, v in bb.items()}, "author": "MMSelfSup"}
    torch.save(extracted, out_dir / f"{PREFIX}_backbone_legacy.pth", _use_new_zipfile_serialization=False)

    img = Gen(11).normal((1, 3, IMG, IMG), 1.0)
    with torch.no_grad():
        outs = run_all(sd_v09, img)
        outs_head = run_all(sd_head, img)
    # sanity: k bias of the 0.x-HEAD decoder layout cancels in the softmax
    k_bias_diff = (outs["logits"] - outs_head["logits"]).abs().max().item()
    assert k_bias_diff < 1e-9, k_bias_diff
    for k, v in outs.items():
        assert torch.isfinite(v).all(), k

    tensors = OrderedDict([("input", img)] + [(k, v.float()) for k, v in outs.items()])
    for name, t in tensors.items():
        (out_dir / f"{PREFIX}_{name}.f32").write_bytes(t.contiguous().numpy().astype("<f4").tobytes())

    # reload checks: every file loads; the legacy file really is legacy
    for f in (f"{PREFIX}_legacy.pth", f"{PREFIX}_qkvbias_legacy.pth",
              f"{PREFIX}_backbone_legacy.pth"):
        ck = torch.load(out_dir / f, map_location="cpu", weights_only=False)
        assert isinstance(ck["state_dict"], dict)
    raw = (out_dir / f"{PREFIX}_legacy.pth").read_bytes()[:15]
    assert raw[:4] == b"\x80\x02\x8a\x0a" and raw[14:15] == b"\x2e", raw

    visible = [i for i in range(N) if i not in MASKED]
    info = OrderedDict(
        config=dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
                    regressor_depth=REG_DEPTH, decoder_depth=DEC_DEPTH, vocab_size=VOCAB, ln_eps=EPS,
                    num_mask=len(MASKED)),
        masked=MASKED,
        visible=visible,
        tensors={name: list(t.shape) for name, t in tensors.items()},
        tensor_files={name: f"{PREFIX}_{name}.f32" for name in tensors},
        checkpoints={
            f"{PREFIX}_legacy.pth": "{meta, state_dict}; decoder attn q_bias/v_bias (mmselfsup v0.9.0); legacy",
            f"{PREFIX}_qkvbias_legacy.pth": "{meta, state_dict}; decoder attn.qkv.bias [3D] (0.x HEAD); legacy",
            f"{PREFIX}_backbone_legacy.pth": "{state_dict, author}; backbone only, prefix stripped; legacy",
        },
        teacher_note="teacher.* = backbone.* + N(0, 0.01) noise (pos_embed equal); latent_target uses teacher",
        head_note="head.encoder.blocks.* is a subset of the micro DALL-E (importers must ignore head.*)",
        k_bias_max_logit_diff=k_bias_diff,
        encoder_out_first8=tensors["encoder_out"][0, 0, :8].tolist(),
        logits_first8=tensors["logits"][0, 0, :8].tolist(),
        keys_v09={k: list(v.shape) for k, v in sd_v09.items()},
        keys_qkvbias_only=sorted(set(sd_head) - set(sd_v09)),
        num_params=dict(backbone=sum(v.numel() for v in bb.values()),
                        neck_v09=sum(v.numel() for v in nk_v09.values()),
                        neck_qkvbias=sum(v.numel() for v in nk_head.values())),
        torch=torch.__version__,
    )
    (out_dir / f"{PREFIX}.json").write_text(json.dumps(info, indent=1) + "\n")
    for f in sorted(out_dir.glob(f"{PREFIX}*")):
        print(f"{f.stat().st_size:>9}  {f.name}")
    print("k-bias logit diff", k_bias_diff, "params", info["num_params"])


if __name__ == "__main__":
    main()
