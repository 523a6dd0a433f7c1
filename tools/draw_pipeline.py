"""Draw LIAF-KD's pipeline (the paper's Fig. 1, as liaf_lab implements it) to docs/figures/liaf_pipeline.png.

usage: python tools/draw_pipeline.py [OUT.png]

The figure is a schematic (boxes and arrows, no measured numbers): stage 1 learns the instance selectors on
the frozen teacher (Eq. 2-5); stage 2 scores every ground-truth instance on the teacher's and the student's
features with the frozen selectors (Eq. 6), builds one mask per side (Eq. 7-8) and distils the masked FPN
features (Eq. 9) beside the student's task loss. docs/method.md and notebook 01 show it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures" / "liaf_pipeline.png"

# name: (x, y, text, face colour); x, y: the box's centre in a 16 x 7 frame
BOXES = {
    "image": (1.1, 3.5, "image +\nGT boxes", "#eeeeee"),
    "teacher": (4.2, 5.5, "teacher\nbackbone + FPN\n(frozen)", "#d9d9d9"),
    "student": (4.2, 1.5, "student\nbackbone + FPN", "#cfe2f3"),
    "proj": (7.3, 1.5, "projector $f_\\phi$\n(1x1 conv)", "#cfe2f3"),
    "roi": (7.3, 3.5, "RoIAlign on each\nGT box (Eq. 2)", "#fff2cc"),
    "sel": (10.6, 3.5, "K selectors $E_k$:\nsoftmax scores (Eq. 3),\nmean over K (Eq. 6)", "#fff2cc"),
    "mask": (13.9, 3.5, "instance masks\n$M^T$, $M^S$ (Eq. 7-8)", "#fce5cd"),
    "loss": (13.9, 1.2, "MSE of $M^T F^T$ and\n$f_\\phi(M^S F^S)$ (Eq. 9)", "#f4cccc"),
    "task": (7.3, -0.3, "student head:\ntask loss", "#cfe2f3"),
    "stage1": (10.6, 6.0, "stage 1 (Eq. 5): masked $F^T$\nthrough the teacher's head\n+ $\\mu L_{div}$ (Eq. 4)", "#d9ead3"),
}
ARROWS = [("image", "teacher", ""), ("image", "student", ""), ("student", "proj", "$F^S$"),
          ("teacher", "roi", "$F^T$"), ("proj", "roi", ""), ("roi", "sel", "$F_{ROI}$"), ("sel", "mask", "$A^T$, $A^S$"),
          ("mask", "loss", ""), ("student", "task", ""), ("sel", "stage1", "")]
WIDTH, HEIGHT = 2.5, 1.2


def _edge(x: float, y: float, towards: tuple[float, float], pad: float = 0.15) -> tuple[float, float]:
    """Where the line from the centre (x, y) of a box towards a point leaves the box (plus ``pad``)."""
    dx, dy = towards[0] - x, towards[1] - y
    scale = min(abs((WIDTH / 2 + pad) / dx) if dx else float("inf"), abs((HEIGHT / 2 + pad) / dy) if dy else float("inf"))
    return x + dx * scale, y + dy * scale


def draw() -> Figure:
    """The schematic as a matplotlib Figure (no pyplot state)."""
    fig = Figure(figsize=(12, 5.4))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.4, 15.4)
    ax.set_ylim(-1.6, 7.0)
    ax.axis("off")
    for x, y, text, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x - WIDTH / 2, y - HEIGHT / 2), WIDTH, HEIGHT, boxstyle="round,pad=0.08",
                                    facecolor=colour, edgecolor="black", linewidth=0.8))
        ax.text(x, y, text, ha="center", va="center", fontsize=9)
    for a, b, label in ARROWS:
        (xa, ya), (xb, yb) = BOXES[a][:2], BOXES[b][:2]
        start, end = _edge(xa, ya, (xb, yb)), _edge(xb, yb, (xa, ya))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, linewidth=1.0, color="black"))
        if label:
            ax.text((start[0] + end[0]) / 2 + 0.12, (start[1] + end[1]) / 2 + 0.12, label, fontsize=9, color="#333333")
    ax.text(7.5, -1.4, "stage 2: loss = task loss + loss_weight x sum over FPN levels of Eq. 9; "
            "the selectors are frozen, the projectors learn", ha="center", fontsize=9, style="italic")
    return fig


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    draw().savefig(out, dpi=90)
    print(out)
