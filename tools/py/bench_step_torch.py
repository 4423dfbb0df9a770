#!/usr/bin/env python3
"""PyTorch eager baseline for one CAE training step (forward + backward, pixel target), the same
shapes as `cargo bench -p cae-trainer --bench step` (presets micro b8 and tiny b2, spec §7),
written from the spec (§2.1 encoder with q/v bias and layer scale, §2.3 regressor, §2.4 decoder,
§2.5 losses with the MAE-style pixel target).

    python3 -m venv venv && venv/bin/pip install torch numpy
    venv/bin/python tools/py/bench_step_torch.py --threads 2
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # img, patch, dim, depth, heads, mlp, regressor, decoder, num_mask, batch
    "micro": (64, 16, 64, 2, 2, 256, 1, 1, 6, 8),
    "tiny": (224, 16, 192, 12, 3, 768, 4, 4, 75, 2),
}


class Attn(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d, h, m):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = Attn(d, h)
        self.mlp = nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Linear(m, d))
        self.g1, self.g2 = nn.Parameter(0.1 * torch.ones(d)), nn.Parameter(0.1 * torch.ones(d))

    def forward(self, x):
        x = x + self.g1 * self.attn(self.n1(x))
        return x + self.g2 * self.mlp(self.n2(x))


class Cross(nn.Module):
    def __init__(self, d, h, m):
        super().__init__()
        self.h = h
        self.nq, self.nk, self.nv, self.n2 = (nn.LayerNorm(d, eps=1e-6) for _ in range(4))
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Linear(m, d))
        self.g1, self.g2 = nn.Parameter(0.1 * torch.ones(d)), nn.Parameter(0.1 * torch.ones(d))

    def forward(self, q, x_vis, p_m, p_v):
        kv = torch.cat([x_vis, q], 1)
        p_kv = torch.cat([p_v, p_m], 1)
        b, nq, d = q.shape
        hd = d // self.h
        Q = F.linear(self.nq(q + p_m), self.q.weight, self.q_bias).reshape(b, nq, self.h, hd).transpose(1, 2)
        K = F.linear(self.nk(kv + p_kv), self.k.weight).reshape(b, -1, self.h, hd).transpose(1, 2)
        V = F.linear(self.nv(kv), self.v.weight, self.v_bias).reshape(b, -1, self.h, hd).transpose(1, 2)
        a = ((Q @ K.transpose(-2, -1)) * hd ** -0.5).softmax(-1)
        x = q + self.g1 * self.proj((a @ V).transpose(1, 2).reshape(b, nq, d))
        x = self.n2(x)
        return x + self.g2 * self.mlp(x)


def sincos(grid, d):
    p = d // 4
    omega = 1.0 / 10000 ** (torch.arange(p, dtype=torch.float32) / p)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], 1)


class Encoder(nn.Module):
    def __init__(self, img, patch, d, depth, h, m):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, h, m) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.register_buffer("pos", sincos(img // patch, d))

    def forward(self, img, idx):
        e = self.patch_embed(img).flatten(2).transpose(1, 2)
        b, _, d = e.shape
        x = e.gather(1, idx[..., None].expand(-1, -1, d)) + self.pos[idx]
        x = torch.cat([self.cls.expand(b, -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Cae(nn.Module):
    def __init__(self, img, patch, d, depth, h, m, nreg, ndec):
        super().__init__()
        self.encoder = Encoder(img, patch, d, depth, h, m)
        self.teacher = Encoder(img, patch, d, depth, h, m).requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg = nn.ModuleList(Cross(d, h, m) for _ in range(nreg))
        self.norm_reg = nn.LayerNorm(d, eps=1e-6)
        self.dec = nn.ModuleList(Block(d, h, m) for _ in range(ndec))
        self.norm_dec = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, patch * patch * 3)

    def forward(self, img, vis, msk, target):
        x = self.encoder(img, vis)[:, 1:]
        with torch.no_grad():
            t = self.teacher(img, msk)[:, 1:]
        pos = self.encoder.pos
        p_m, p_v = pos[msk], pos[vis]
        q = self.mask_token.expand(img.shape[0], msk.shape[1], -1)
        for r in self.reg:
            q = r(q, x, p_m, p_v)
        pred = self.norm_reg(q)
        y = pred + p_m
        for blk in self.dec:
            y = blk(y)
        out = self.head(self.norm_dec(y))
        tgt = target.gather(1, msk[..., None].expand(-1, -1, target.shape[-1]))
        return F.mse_loss(out, tgt) + 2 * F.mse_loss(pred, t)


def pixel_targets(img, p):
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, (img, patch, d, depth, h, m, nreg, ndec, nmask, batch) in PRESETS.items():
        torch.manual_seed(0)
        model = Cae(img, patch, d, depth, h, m, nreg, ndec)
        n = (img // patch) ** 2
        images = torch.randn(batch, 3, img, img)
        perm = torch.stack([torch.randperm(n) for _ in range(batch)])
        msk, vis = perm[:, :nmask].sort(1).values, perm[:, nmask:].sort(1).values
        target = pixel_targets(images, patch)
        for _ in range(2):
            model(images, vis, msk, target).backward()
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            model(images, vis, msk, target).backward()
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"{name}_b{batch}: median {times[len(times) // 2] * 1e3:.2f} ms (torch {torch.__version__}, {args.threads} threads)")


if __name__ == "__main__":
    main()
