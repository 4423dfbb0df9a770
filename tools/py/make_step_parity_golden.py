#!/usr/bin/env python3
"""Golden files for the 10-step training parity test (spec §2.2, §2.5, §4, §7 B).

    python3 -m venv venv && venv/bin/pip install torch numpy safetensors
    venv/bin/python tools/py/make_step_parity_golden.py trainer/tests/golden/parity

Needs only torch. Independent float64 reference of the CAE training step, written from the spec
(not from the Rust trainer), at the `micro` size of spec §7 B (img 64, patch 16 -> 16 patches,
D 64, depth 2, 2 heads, MLP 256, regressor 1, decoder 1, vocab 512, 6 masked / 10 visible).
The forward pass (encoder, teacher, regressor, decoder, head) and the state-dict builders are
imported from make_mmselfsup_golden.py (its outputs are unchanged); this script adds:

  - init weights: seeded random mmselfsup v0.9.0 ("legacy") layout, teacher.* == backbone.*
    (spec §2.2, §2.6: the teacher starts as a copy of the encoder), no head.* (the tokenizer is
    not part of this test; trainer/src/weights/mmselfsup.rs ignores head.* anyway);
  - 2 seeded batches (B = 4), step t (0-based) uses batch t % 2: images already normalised,
    block masks drawn with the spec §1.1 generator (exactly 6 of 16 masked, min block 2,
    spec §7 B), DALL-E targets given directly as random ids in [0, 512);
  - 10 optimizer steps: loss = CE + 2·MSE (spec §2.5), teacher hard copy after the teacher
    forward and before the optimizer step (spec §2.2), global-norm clipping at 3.0 and
    AdamW (torch.optim.AdamW semantics) with the MS0 name-based no-decay rule and the MS0
    warmup + cosine per-iteration lr with lr(0) = 0 (spec §4).

Files (all under the output dir):
  init_legacy.pth              {meta, state_dict}; backbone.*, neck.* (no teacher.*: a reader
                               starts it as a copy of the encoder, spec §2.2);
                               f32; legacy pickle (`_use_new_zipfile_serialization=False`)
  batches.safetensors          images F32 [2,B,3,64,64]; visible I64 [2,B,10]; masked I64 [2,B,6]
                               (both ascending raster indices); tokens I64 [2,B,6] (target id of
                               masked[s,b,j])
  config.json                  every number that affects the result, preset dims, param groups
                               (no_decay / decay / frozen names), lr per step, provenance
  expected_losses.json         per step 1..10: batch, lr, loss, loss_main, loss_align,
                               grad_norm (global L2 norm before clipping), clip_coef
  final_legacy.pth             state dict after 10 steps (backbone.*, neck.*), F32, the same
                               legacy pickle as init_legacy.pth,
                               same key names as init_legacy.pth

Reference values are computed in float64 from the stored f32 weights and images and rounded
to f32 only when written.
"""
import json
import math
import random
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.dont_write_bytecode = True  # no __pycache__ in tools/py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_mmselfsup_golden as mm  # noqa: E402  (forward + state-dict builders, micro preset)

SEED = 20240611
B, STEPS, NUM_BATCHES = 4, 10, 2
N_MASK, MIN_BLOCK = 6, 2  # spec §7 B
N_VIS = mm.N - N_MASK

# Every number that changes the result (spec §4 unless noted). base_lr is the PEAK lr, used as
# is (no batch scaling): spec's 1.5e-3 scaled to B = 4 would barely move the weights.
OPT = OrderedDict(
    base_lr=2e-3,        # peak lr (after any scaling)
    min_lr=1e-5,         # spec §4 cosine floor
    warmup_iters=2,      # W
    total_iters=STEPS,   # T
    weight_decay=0.05,
    betas=[0.9, 0.999],
    eps=1e-8,
    clip_max_norm=3.0,
    clip_eps=1e-6,       # scale = max_norm / (norm + 1e-6) when < 1 (spec §4)
    align_weight=2.0,    # lambda (spec §2.5)
    teacher_momentum=0.0,  # spec §2.2: hard copy
    no_decay_substrings=["norm", "bias", "gamma"],  # spec §4, unanchored search in mmselfsup names
)
# LN_k's bias only shifts every key by the same vector W_k·β: it adds one constant to each row of
# regressor logits, which cancels in the softmax (cf. the k-bias note of spec §2.4). Its gradient
# is 0 up to rounding, so Adam turns rounding noise into O(lr) steps: the f64 reference leaves it
# at init, an f32 trainer moves it by noise (up to ~1e-3 here). It affects no loss or other weight.
ZERO_GRAD = [f"neck.regressors.{i}.norm1_k_cross.bias" for i in range(mm.REG_DEPTH)]


# ---------------- data (spec §1.1 block mask at the micro size) ----------------

def block_mask(rng, grid=mm.GRID, n=N_MASK, min_num=MIN_BLOCK, min_aspect=0.3):
    """Spec §1.1 BEiTMaskGenerator with `while count != N`: exactly n masked patches."""
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = [[0] * grid for _ in range(grid)]
    count = 0
    while count != n:
        cap = n - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_num, cap)
            ar = math.exp(rng.uniform(*log_ar))
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if w < grid and h < grid:
                top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                already = sum(mask[r][c] for r in range(top, top + h) for c in range(left, left + w))
                if 0 < h * w - already <= cap:
                    for r in range(top, top + h):
                        for c in range(left, left + w):
                            if mask[r][c] == 0:
                                mask[r][c] = 1
                                delta += 1
                if delta > 0:
                    break
        count += delta
    flat = [mask[r][c] for r in range(grid) for c in range(grid)]
    return [i for i, m in enumerate(flat) if not m], [i for i, m in enumerate(flat) if m]


def make_batches():
    g = torch.Generator().manual_seed(SEED + 1)
    rng = random.Random(SEED + 2)
    images = torch.randn(NUM_BATCHES, B, 3, mm.IMG, mm.IMG, generator=g).float()
    vis, msk = zip(*[block_mask(rng) for _ in range(NUM_BATCHES * B)])
    visible = torch.tensor(vis, dtype=torch.int64).reshape(NUM_BATCHES, B, N_VIS)
    masked = torch.tensor(msk, dtype=torch.int64).reshape(NUM_BATCHES, B, N_MASK)
    tokens = torch.randint(0, mm.VOCAB, (NUM_BATCHES, B, N_MASK), generator=g, dtype=torch.int64)
    return OrderedDict(images=images, visible=visible, masked=masked, tokens=tokens)


# ---------------- model state ----------------

def init_state():
    """v0.9.0 layout (decoder q_bias/v_bias), teacher = exact copy of backbone, no head.*."""
    bb = mm.backbone(mm.Gen(SEED + 3), "backbone")
    teacher = OrderedDict((k.replace("backbone.", "teacher.", 1), v.clone()) for k, v in bb.items())
    nk = mm.neck(mm.Gen(SEED + 4), qkv_full_bias=False)
    return OrderedDict(list(bb.items()) + list(teacher.items()) + list(nk.items()))


def is_trainable(name):
    # spec §4: pos_embed (fixed sin-cos) and the teacher are frozen; the tokenizer is absent here
    return not (name.startswith("teacher.") or name.endswith("pos_embed"))


def no_decay(name):
    # spec §4 "Weight-decay groups": MS0 paramwise `norm|bias|gamma`, unanchored regex search
    return any(s in name for s in OPT["no_decay_substrings"])


def lr_at(t):
    """Spec §4 (MS0 StepFixCosineAnnealing, by_epoch=False, linear warmup), t = 0-based iteration
    before its step: c(t) = min + ½(base − min)(1 + cos(π(t − W)/(T − W)));
    lr(t) = c(t)·t/W for t < W (so lr(0) = 0), else c(t)."""
    base, lo, w, total = OPT["base_lr"], OPT["min_lr"], OPT["warmup_iters"], OPT["total_iters"]
    c = lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * (t - w) / (total - w)))
    return c * t / w if t < w else c


# ---------------- one training step (float64) ----------------

def losses(sd, images, visible, masked, tokens):
    """Spec §2.5: loss = mean CE over the B·6 masked tokens (batch-major, raster order)
    + λ · mean over B·6·D of (latent_pred − latent_target)², latent_target without grad.
    The forward is per sample (masks differ per sample; nothing mixes samples)."""
    preds, targets, logits = [], [], []
    for b in range(images.shape[0]):
        img, vis, msk = images[b:b + 1], visible[b].tolist(), masked[b].tolist()
        with torch.no_grad():  # spec §2.2: teacher on the masked patches (+ cls, dropped)
            targets.append(mm.encoder(img, sd, "teacher", msk)[:, 1:])
        x_vis = mm.encoder(img, sd, "backbone", vis)[:, 1:]  # spec §2.1, cls dropped
        lp, lg = mm.neck_forward(x_vis, sd, vis, msk)        # spec §2.3, §2.4
        preds.append(lp)
        logits.append(lg)
    logits = torch.cat(logits).reshape(-1, mm.VOCAB)
    loss_main = torch.nn.functional.cross_entropy(logits, tokens.reshape(-1))
    loss_align = OPT["align_weight"] * ((torch.cat(preds) - torch.cat(targets)) ** 2).mean()
    return loss_main + loss_align, loss_main, loss_align


def train(init, batches, dtype=torch.float64, log=True):
    sd = OrderedDict((k, v.to(dtype).clone().requires_grad_(is_trainable(k))) for k, v in init.items())
    trainable = [k for k in sd if is_trainable(k)]
    groups = [
        dict(params=[sd[k] for k in trainable if not no_decay(k)], weight_decay=OPT["weight_decay"]),
        dict(params=[sd[k] for k in trainable if no_decay(k)], weight_decay=0.0),
    ]
    # torch.optim.AdamW semantics: p ← p·(1 − lr·wd); m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²;
    # p ← p − lr·(m/(1 − β1^k)) / (sqrt(v/(1 − β2^k)) + eps), k = 1-based step count (it counts
    # the lr = 0 first step too). amsgrad off.
    opt = torch.optim.AdamW(groups, lr=0.0, betas=tuple(OPT["betas"]), eps=OPT["eps"],
                            weight_decay=OPT["weight_decay"], amsgrad=False, foreach=False)
    rows = []
    for t in range(STEPS):
        s = t % NUM_BATCHES
        lr = lr_at(t)
        images = batches["images"][s].to(dtype)
        loss, l_main, l_align = losses(sd, images, batches["visible"][s], batches["masked"][s],
                                       batches["tokens"][s])
        # Spec §2.2 (and the project decision at the top of the spec): right after the teacher
        # forward, teacher ← m·teacher + (1 − m)·student with m = 0, i.e. a hard copy of the
        # student as it is NOW (before this step's optimizer update). So the teacher used in
        # iteration t holds the student of the start of iteration t−1 (one-step lag; t = 0: init).
        with torch.no_grad():
            for k in sd:
                if k.startswith("backbone."):
                    sd["teacher." + k[len("backbone."):]].copy_(sd[k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Spec §4 gradient clipping: global L2 norm over every parameter with a gradient,
        # scale = max_norm/(norm + 1e-6) applied only when it is below 1.
        grads = [sd[k].grad for k in trainable]
        assert all(g is not None for g in grads)
        norm = torch.sqrt(sum((g * g).sum() for g in grads)).item()
        coef = OPT["clip_max_norm"] / (norm + OPT["clip_eps"])
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.step()
        rows.append(OrderedDict(step=t + 1, batch=s, lr=lr, loss=loss.item(), loss_main=l_main.item(),
                                loss_align=l_align.item(), grad_norm=norm, clip_coef=min(coef, 1.0)))
        if log:
            print(f"step {t + 1:2d} batch {s} lr {lr:.3e} loss {loss.item():.6f} main {l_main.item():.6f} "
                  f"align {l_align.item():.6f} |g| {norm:.4f}{' clipped' if coef < 1 else ''}")
    return sd, rows


# ---------------- output ----------------

def without_teacher(sd):
    """The state dict without teacher.*: the files leave the teacher out (the reader makes it a
    copy of the encoder, as the spec starts it; the losses catch a wrong copy timing)."""
    return OrderedDict((k, v) for k, v in sd.items() if not k.startswith("teacher."))


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/golden/parity")
    out_dir.mkdir(parents=True, exist_ok=True)

    init = init_state()
    batches = make_batches()
    final, rows = train(init, batches)
    final32 = OrderedDict((k, v.detach().float()) for k, v in final.items())

    # ---- sanity checks ----
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "loss_main", "loss_align", "grad_norm"))
    assert all(math.isfinite(v.abs().max().item()) for v in final32.values())
    assert rows[0]["lr"] == 0.0
    bb = [k for k in init if k.startswith("backbone.") and is_trainable(k)]
    rel = lambda ks: math.sqrt(sum(((final32[k].double() - init[k].double()) ** 2).sum().item() for k in ks)
                               / sum((init[k].double() ** 2).sum().item() for k in ks))
    rel_backbone = rel(bb)
    rel_neck = rel([k for k in init if k.startswith("neck.")])
    assert rel_backbone > 1e-4, rel_backbone
    # pos_embed never moves; final teacher = backbone at the start of step 10 (≠ final backbone)
    assert torch.equal(final32["backbone.pos_embed"], init["backbone.pos_embed"])
    assert not torch.equal(final32["teacher.cls_token"], final32["backbone.cls_token"])
    drops = {s: [r["loss"] for r in rows if r["batch"] == s] for s in range(NUM_BATCHES)}
    decreasing = {s: v[-1] < v[0] for s, v in drops.items()}
    print("rel change backbone", rel_backbone, "neck", rel_neck, "loss first->last per batch",
          {s: (v[0], v[-1]) for s, v in drops.items()})
    assert all(decreasing.values()), f"loss on a repeated batch did not decrease: {drops}"
    assert all((final32[k] - init[k]).abs().max().item() < 1e-6 for k in ZERO_GRAD)

    # ---- the same run in f32 (torch CPU): how far an f32 trainer is expected to land ----
    f32, rows32 = train(init, batches, dtype=torch.float32, log=False)
    f32_gap = OrderedDict(
        max_abs_loss_diff=max(abs(a[k] - b[k]) for a, b in zip(rows, rows32) for k in ("loss", "loss_main", "loss_align")),
        max_abs_grad_norm_diff=max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, rows32)),
        max_abs_weight_diff=max((f32[k].detach() - final32[k]).abs().max().item() for k in final32 if k not in ZERO_GRAD),
        max_abs_weight_diff_zero_grad=max((f32[k].detach() - final32[k]).abs().max().item() for k in ZERO_GRAD),
    )
    print("f32 torch vs f64 reference:", dict(f32_gap))

    # ---- write ----
    sd_file = mm.with_metadata(without_teacher(init))
    meta = mm.meta()
    meta["config"] = "micro CAE step-parity golden (tools/py/make_step_parity_golden.py); initial weights"
    meta["epoch"], meta["iter"] = 0, 0
    torch.save({"meta": meta, "state_dict": sd_file}, out_dir / "init_legacy.pth",
               _use_new_zipfile_serialization=False)
    save_file(dict(batches), out_dir / "batches.safetensors", {"format": "cae step parity batches"})
    meta_final = dict(meta, config="micro CAE step-parity golden: weights after %d steps" % STEPS, iter=STEPS)
    torch.save({"meta": meta_final, "state_dict": mm.with_metadata(without_teacher(final32))},
               out_dir / "final_legacy.pth", _use_new_zipfile_serialization=False)

    trainable = [k for k in init if is_trainable(k)]
    config = OrderedDict(
        preset="micro",
        model=dict(img_size=mm.IMG, patch_size=mm.PATCH, embed_dim=mm.D, depth=mm.DEPTH, num_heads=mm.HEADS,
                   mlp_dim=mm.MLP, regressor_depth=mm.REG_DEPTH, decoder_depth=mm.DEC_DEPTH,
                   vocab_size=mm.VOCAB, ln_eps=mm.EPS, num_mask=N_MASK, num_visible=N_VIS,
                   drop_path=0.0, decoder_attn_bias="q_bias/v_bias (mmselfsup v0.9.0)"),
        batch_size=B, steps=STEPS, num_batches=NUM_BATCHES, batch_of_step="batch = (step - 1) % 2, step 1-based",
        optimizer=dict(OPT, type="AdamW (torch.optim.AdamW semantics, amsgrad off)",
                       lr_formula="c(t) = min_lr + 0.5*(base_lr - min_lr)*(1 + cos(pi*(t - W)/(T - W))); "
                                  "lr(t) = c(t)*t/W if t < W else c(t); t = step - 1",
                       clip_formula="norm = sqrt(sum g^2) over all trainable grads (pre-clip); "
                                    "if max_norm/(norm + clip_eps) < 1: g *= max_norm/(norm + clip_eps)",
                       grad_accumulation=1, loss_scaling=None),
        lr_per_step=[r["lr"] for r in rows],
        loss="loss = CE_mean(logits[B*6, 512], tokens) + align_weight * mean((latent_pred - latent_target)^2)",
        teacher="hard copy backbone.* -> teacher.* each step after the teacher forward, before backward/"
                "optimizer step (spec 2.2): final teacher = backbone at the start of step 10",
        zero_grad_params=ZERO_GRAD,
        zero_grad_note="gradient is 0 up to rounding (LN_k bias shifts all regressor keys equally; softmax "
                       "cancels it): the reference keeps it at init, an f32 trainer moves it by noise "
                       "(Adam, up to ~sum(lr)); skip it or compare with atol ~1e-2",
        f32_torch_vs_reference=f32_gap,
        param_groups=dict(no_decay=[k for k in trainable if no_decay(k)],
                          decay=[k for k in trainable if not no_decay(k)],
                          frozen=[k for k in init if not is_trainable(k)]),
        num_params=dict(trainable=sum(init[k].numel() for k in trainable),
                        backbone=sum(v.numel() for k, v in init.items() if k.startswith("backbone.")),
                        neck=sum(v.numel() for k, v in init.items() if k.startswith("neck."))),
        files=dict(init="init_legacy.pth", batches="batches.safetensors",
                   final_weights="final_legacy.pth", losses="expected_losses.json"),
        checks=dict(rel_change_backbone=rel_backbone, rel_change_neck=rel_neck,
                    max_abs_weight_change=max((final32[k] - init[k]).abs().max().item() for k in trainable),
                    loss_first_last_per_batch={str(s): [v[0], v[-1]] for s, v in drops.items()}),
        provenance=dict(script="tools/py/make_step_parity_golden.py", seed=SEED, torch=torch.__version__,
                        precision="float64 compute from f32 stored inputs; outputs rounded to f32",
                        spec="shared/spec/cae.md §2.2, §2.5, §4, §7 B"),
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out_dir / "expected_losses.json").write_text(json.dumps(dict(steps=rows), indent=1) + "\n")

    # ---- reload checks ----
    ck = torch.load(out_dir / "init_legacy.pth", map_location="cpu", weights_only=False)
    assert list(ck["state_dict"]) == list(without_teacher(init))
    assert (out_dir / "init_legacy.pth").read_bytes()[:4] == b"\x80\x02\x8a\x0a"  # legacy pickle
    back = load_file(out_dir / "batches.safetensors")
    assert sorted(back) == sorted(batches) and all(torch.equal(back[k], batches[k]) for k in batches)
    fin = torch.load(out_dir / "final_legacy.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(fin[k], v) for k, v in without_teacher(final32).items())
    total = 0
    for f in sorted(out_dir.iterdir()):
        total += f.stat().st_size
        print(f"{f.stat().st_size:>9}  {f.name}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
