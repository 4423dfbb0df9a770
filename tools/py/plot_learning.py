"""Plot of tools/learning-bench.sh: top-1 accuracy against pre-training steps, one panel per
set, with the random-init values (steps 0) as dashed lines.

    python3 tools/py/plot_learning.py learning.json learning.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = json.load(open(sys.argv[1]))["rows"]
sets = list(dict.fromkeys(r["set"] for r in rows))
fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
metrics = [("linear_mean", "linear probe, mean"), ("linear_cls", "linear probe, cls"),
           ("knn_mean", "k-NN, mean"), ("knn_cls", "k-NN, cls")]
colours = ["tab:blue", "tab:cyan", "tab:red", "tab:orange"]
for ax, s in zip(axes[0], sets):
    for preset in dict.fromkeys(r["preset"] for r in rows if r["set"] == s):
        rs = sorted((r for r in rows if r["set"] == s and r["preset"] == preset), key=lambda r: r["steps"])
        trained = [r for r in rs if r["steps"] > 0]
        base = next((r for r in rs if r["steps"] == 0), None)
        for (key, label), c in zip(metrics, colours):
            ax.plot([r["steps"] for r in trained], [100 * r[key] for r in trained], "o-", color=c,
                    label=f"{preset}: {label}")
            if base is not None:
                ax.axhline(100 * base[key], color=c, linestyle="--", linewidth=1)
        r0 = rs[0]
        ax.axhline(100 / r0["classes"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{s}: {r0['classes']} classes, {r0['train_samples']} train / {r0['val_samples']} val")
    ax.set_xlabel("pre-training steps (dashed: random init, dotted: chance)")
    ax.set_ylabel("top-1 %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
print(f"wrote {sys.argv[2]}")
