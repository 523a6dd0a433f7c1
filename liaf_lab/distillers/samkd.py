"""SAMKD: Spatial-aware Adaptive Masking Knowledge Distillation (Zhang, Li, Li, Xu; arXiv 2501.07101).

No public code exists; everything follows the paper, Sec. III. Per FPN
level the map is split into a spatial pyramid of ``n x n`` cells (``n`` in 1, 2, 4). In every cell the
teacher's spatial (Eq. 1) and channel (Eq. 2) attention give threshold masks (Eq. 3-4); the aligned
student feature is masked with each (Eq. 5-6), rebuilt by a conv block and an MLP and mixed (Eq. 7),
and compared with the teacher's cell (Eq. 8, SFD). The head's class logits are averaged per cell
(Eq. 9-10) and distilled with a KL divergence weighted by the cell's teacher-student cosine distance
(Eq. 11-12, SLD). The KD loss is ``alpha * L_Feat + beta * L_Logit`` (Eq. 13).

Cells follow ``torch.nn.functional.adaptive_avg_pool2d``: cell ``i`` of ``n`` along a side of length
``L`` spans ``floor(i L / n) <= p < ceil((i + 1) L / n)``, so on a side that ``n`` does not divide the
cells differ in size by one and neighbours may share a row (or column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.options import NonNegative, Positive, PositiveInt, Weight
from .base import FeatureDistiller, KDInputs
from .registry import register_distiller

Pyramid = Literal["1-2-4", "1-2", "1-4", "2-4", "1", "2", "4"]
SmallLevels = Literal["skip", "error"]
SpatialNorm = Literal["mean", "softmax", "none"]
FeatureNorm = Literal["sum", "mean"]
Divergence = Literal["binary", "softmax"]
COSINE_EPS = 1e-8  # floor of |u| |v| in the cosine distance (Eq. 11)
HEAD_KEY = "cls_logits"


def cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each of ``cells`` cells along a side of ``size`` (adaptive pooling's rule).

    Cell ``i`` spans ``floor(i * size / cells)`` to ``ceil((i + 1) * size / cells)``.
    """
    return [((i * size) // cells, -(-(i + 1) * size // cells)) for i in range(cells)]


def cell_index(size: int, cells: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Gather indices of the cells of one side, padded to the longest cell.

    Returns ``index [cells, L]`` (long; positions past a cell's end repeat the last row, clamped to the
    side) and ``valid [cells, L]`` (bool; the position lies inside the cell), ``L`` the longest cell.
    """
    bounds = cell_bounds(size, cells)
    longest = max(end - start for start, end in bounds)
    starts = torch.tensor([start for start, _ in bounds], device=device)
    lengths = torch.tensor([end - start for start, end in bounds], device=device)
    offsets = torch.arange(longest, device=device)
    return (starts[:, None] + offsets).clamp_max(size - 1), offsets < lengths[:, None]


def split_cells(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The cells of ``x [N, C, H, W]`` as a batch ``[N * n * n, C, L_h, L_w]`` (image, cell row, cell column order).

    ``rows [n, L_h]`` and ``cols [n, L_w]`` come from ``cell_index``; padded positions hold repeated
    values and must be masked by the caller.
    """
    n_img, channels = x.shape[:2]
    cells = x[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # [N, C, n, n, L_h, L_w]
    return cells.permute(0, 2, 3, 1, 4, 5).reshape(n_img * rows.shape[0] * cols.shape[0], channels,
                                                   rows.shape[1], cols.shape[1])


def merge_cells(values: Tensor, rows: Tensor, cols: Tensor, valid: Tensor, size: tuple[int, int]) -> Tensor:
    """The cells of one channel back on the grid (``split_cells`` undone): ``[N * n * n, 1, L_h, L_w]`` ->
    ``[N, H, W]``, each pixel the mean over the cells that hold it (neighbours share a row or column
    where ``n`` does not divide a side); padded positions (``valid [N * n * n, 1, L_h, L_w]`` 0) are ignored.
    """
    height, width = size
    n_img = values.shape[0] // (rows.shape[0] * cols.shape[0])
    index = (rows[:, None, :, None] * width + cols[None, :, None, :]).expand(n_img, -1, -1, -1, -1).reshape(n_img, -1)
    valid = valid.expand_as(values).reshape(n_img, -1)
    total = values.new_zeros(n_img, height * width).scatter_add_(1, index, (values.reshape(n_img, -1) * valid))
    count = valid.new_zeros(n_img, height * width).scatter_add_(1, index, valid)
    return (total / count).view(n_img, height, width)


def spatial_attention(teacher: Tensor, valid: Tensor, count: Tensor, tau: float, norm: SpatialNorm) -> Tensor:
    """Eq. 1 per cell: ``A^s = phi(sigmoid(|F^T_i|^2 / (tau C)))`` over the pixels ``i`` of the cell.

    ``teacher [B, C, L_h, L_w]`` (zero outside the cell), ``valid [B, 1, L_h, L_w]`` (1 inside),
    ``count [B, 1, 1, 1]`` (pixels in the cell). ``phi`` (undefined in the paper) is ``norm``: ``"mean"``
    divides by the cell's mean, ``"softmax"`` is ``H_R W_R softmax`` over the cell, ``"none"`` the identity.
    Returns ``[B, 1, L_h, L_w]`` (meaningful inside the cell only).
    """
    attention = torch.sigmoid(teacher.square().sum(1, keepdim=True) / (tau * teacher.shape[1]))
    if norm == "mean":
        return attention * count / (attention * valid).sum((2, 3), keepdim=True)
    if norm == "softmax":
        logits = attention.masked_fill(valid == 0, float("-inf")).flatten(1)
        return count * torch.softmax(logits, dim=1).view_as(attention)
    return attention


def channel_attention(teacher: Tensor, count: Tensor, tau: float) -> Tensor:
    """Eq. 2 per cell: ``A^c_k = sigmoid(sum_{h,w} F^T_{h,w,k} / (tau H_R W_R))``, ``[B, C, 1, 1]``.

    ``teacher [B, C, L_h, L_w]`` is zero outside the cell; ``count [B, 1, 1, 1]`` its pixel count.
    """
    return torch.sigmoid(teacher.sum((2, 3), keepdim=True) / (tau * count))


def binary_kl(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """Eq. 12's ``D`` for sigmoid classifiers: ``T^2 sum_k KL(Bern(sigma(z^T_k / T)) || Bern(sigma(z^S_k / T)))``.

    ``teacher``, ``student`` ``[B, A*K]`` logits; returns ``[B]`` (summed over anchors and classes).
    """
    t, s = teacher / temperature, student / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return temperature**2 * kl.sum(1)


def softmax_kl(teacher: Tensor, student: Tensor, temperature: float, num_anchors: int) -> Tensor:
    """Eq. 12's ``D`` as Hinton's KD [7]: ``T^2 KL(softmax(z^T / T) || softmax(z^S / T))`` over the K classes.

    ``teacher``, ``student`` ``[B, A*K]`` logits (channel ``a*K + k``); one softmax per anchor, summed over
    anchors. Returns ``[B]``.
    """
    t = F.log_softmax(teacher.unflatten(1, (num_anchors, -1)) / temperature, dim=2)
    s = F.log_softmax(student.unflatten(1, (num_anchors, -1)) / temperature, dim=2)
    return temperature**2 * F.kl_div(s, t, reduction="none", log_target=True).sum((1, 2))


def spatial_block(channels: int) -> nn.Sequential:
    """``theta_s`` of Eq. 7 (the "convolution-based block" of DMKD [8]): conv3x3 -> ReLU -> conv3x3, ``C_t -> C_t``.

    Assumption: the layout of MGD's generation block (DMKD builds on it); PyTorch default init.
    """
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


def channel_block(channels: int) -> nn.Sequential:
    """``theta_c`` of Eq. 7 (the "perceptron-based block"): a per-pixel MLP over channels, Linear -> ReLU -> Linear.

    Written as two 1x1 convs ``C_t -> C_t -> C_t`` (hidden width C_t: assumption); PyTorch default init.
    """
    return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1))


@register_distiller("samkd", label="SAMKD")
class SAMKDDistiller(FeatureDistiller):
    """SAMKD on every FPN level: the terms ``feature`` (``alpha L_Feat``) and ``logit`` (``beta L_Logit``), Eq. 13.

    Per FPN level and pyramid size ``n`` (Sec. III-A: "three coarse-to-fine hierarchical levels with
    respective 1x1, 2x2, and 4x4 divided regions"), for every cell ``R`` (bounds: module docstring):

    * Eq. 1 / 3: ``A^s = phi(sigmoid(|F^T_i|^2 / (tau C)))`` per pixel of the teacher's cell;
      ``M^s = 0`` where ``A^s >= omega_s``, else 1 (shared over channels).
    * Eq. 2 / 4: ``A^c_k = sigmoid(mean_R F^T_k / tau)`` per channel; ``M^c_k = 0`` where ``A^c_k >= omega_c``.
    * Eq. 5-7: ``F_rec = lambda_s theta_s(Theta(F^S) M^s) + mu_c theta_c(Theta(F^S) M^c)``; each cell is
      rebuilt on its own (``theta_s``'s 3x3 convs zero-pad at the cell border, as Eq. 7 applies
      ``theta_s`` to ``F^S_s(x, y)``, the cell). ``Theta`` is a 1x1 conv (the identity where the channels
      agree, unless ``always_project``); Eq. 8's second ``Theta`` is read as this same alignment,
      since ``F_rec`` already has the teacher's channels.
    * Eq. 8: ``L_Feat = sum_levels sum_n sum_R |F^T(R) - F_rec(R)|^2``, divided by the batch size.
    * Eq. 9-10: ``Z(R) = mean_R cls_logits`` ("scale-specific average pooling"; Eq. 9's ``1/X^2`` is read
      as the mean over the cell's pixels, which is what the text and ``adaptive_avg_pool2d`` do).
    * Eq. 11: ``W(R) = 1 - <F^T(R), Theta(F^S)(R)> / (|F^T(R)| |Theta(F^S)(R)|)``, the cells flattened
      (``C H_R W_R``-vectors); the student side is the aligned, unmasked feature.
    * Eq. 12: ``L_Logit = sum_levels sum_n sum_R W(R) D(Z_T(R), Z_S(R))``, divided by the batch size.
      ``D`` is "KL loss" (Sec. III-B, last sentence). GFL / FCOS / RetinaNet classify with one sigmoid
      per class and no background channel, so the default is the per-class binary KL between the
      teacher's and the student's class probabilities, summed over classes (``divergence="binary"``);
      ``"softmax"`` is Hinton's KL of softmaxes over the classes [7], which these detectors never form.

    Args (beyond ``FeatureDistiller``'s), each with where it comes from:
        alpha: weight of ``L_Feat`` (Eq. 13; Sec. IV-D / Fig. 4: 2e-3).
        beta: weight of ``L_Logit`` (Eq. 13; Sec. IV-D / Fig. 4: 6e-6).
        tau: ``tau`` of Eq. 1-2 (value not given; assumption 0.5, FGD's temperature for GFL/RetinaNet).
        omega_s: spatial threshold of Eq. 3 (Table VI: 0.95).
        omega_c: channel threshold of Eq. 4 (Table VI: 0.5).
        lambda_s: ``lambda`` of Eq. 7, weight of the spatial rebuild (Table V: 0.45).
        mu_c: ``mu`` of Eq. 7, weight of the channel rebuild (Table V: 0.55).
        pyramid: the pyramid sizes used, e.g. ``"1-2-4"`` for 1x1, 2x2 and 4x4 (Table III: all three best).
        small_levels: a level whose H or W is below a pyramid size ``n``: ``"skip"`` that size on that
            level (the paper's COCO inputs never meet this: P7 of an 800-pixel side is 7 cells; tiny
            inputs do), ``"error"`` a ``ValueError`` naming the method and the level.
        spatial_norm: ``phi`` of Eq. 1, undefined in the paper: ``"mean"`` (default, assumption) rescales
            the cell's attention to mean 1, so that thresholds near 1 (Table VI tries 0.95, 1.00, 1.05;
            a bare sigmoid never reaches 1) split the cell; ``"softmax"`` is ``H_R W_R softmax`` (FGD's
            form, also mean 1); ``"none"`` leaves the sigmoid.
        feature_norm: ``"sum"`` (Eq. 8 literally: summed over cells, pixels and channels, divided by the
            batch size; large at COCO scale, scale ``alpha`` with it) or ``"mean"`` (each level's sum also
            divided by ``C H W``: a per-level normalisation, each pyramid size then adds one MSE).
        divergence: ``D`` of Eq. 12 (see above).
        kl_temperature: temperature of ``D`` (the paper gives none: 1), with Hinton's ``T^2`` factor.
        num_anchors: anchors per location, for ``divergence="softmax"`` only (RetinaNet 9; FCOS, GFL 1):
            the softmax runs over each anchor's K classes.
        detach_weight: ``W`` of Eq. 11 carries no gradient (assumption: an "auxiliary masking weight",
            like the masks, which are teacher-only).
        always_project: learn ``Theta`` even where student and teacher channels agree.

    The masks depend on the teacher only. ``Theta``, ``theta_s`` and ``theta_c`` (one each per FPN level,
    shared by the pyramid sizes and cells: assumption) learn in stage 2; one stage. Boxes are not read.
    """

    needs = frozenset({"head_outputs"})
    head_keys = (HEAD_KEY,)

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        alpha: Weight = 2e-3
        beta: Weight = 6e-6
        tau: Positive = 0.5
        omega_s: NonNegative = 0.95
        omega_c: NonNegative = 0.5
        lambda_s: Weight = 0.45
        mu_c: Weight = 0.55
        pyramid: Pyramid = "1-2-4"
        small_levels: SmallLevels = "skip"
        spatial_norm: SpatialNorm = "mean"
        feature_norm: FeatureNorm = "sum"
        divergence: Divergence = "binary"
        kl_temperature: Positive = 1.0
        num_anchors: PositiveInt = 1
        detach_weight: bool = True
        always_project: bool = False

    def build(self) -> None:
        self.pyramid = tuple(int(n) for n in self.pyramid.split("-"))  # the option "1-2-4" as cell counts (1, 2, 4)
        self.align = self.make_projectors(True if self.always_project else "auto")
        self.spatial_blocks = nn.ModuleDict({lvl: spatial_block(self.teacher_channels[lvl]) for lvl in self.levels})
        self.channel_blocks = nn.ModuleDict({lvl: channel_block(self.teacher_channels[lvl]) for lvl in self.levels})

    # -- inputs -------------------------------------------------------------------------------------
    def check_inputs(self, inputs: KDInputs) -> None:
        """The base checks (head outputs included), then ``num_anchors`` against the logits and the pyramid sizes."""
        super().check_inputs(inputs)
        for lvl in self.levels:
            channels = inputs.student_head[lvl][HEAD_KEY].shape[1]
            if self.divergence == "softmax" and channels % self.num_anchors:
                raise ValueError(f"{HEAD_KEY} at level {lvl!r} has {channels} channels, not a multiple of "
                                 f"num_anchors={self.num_anchors}")
            self.level_pyramid(lvl, *inputs.student_feats[lvl].shape[2:])

    def level_pyramid(self, level: str, height: int, width: int) -> tuple[int, ...]:
        """The pyramid sizes used on a level of ``height x width``: all of ``pyramid`` that fit (``"skip"``),
        or all of them with a ``ValueError`` if one does not fit (``"error"``)."""
        too_big = [n for n in self.pyramid if n > height or n > width]
        if too_big and self.small_levels == "error":
            raise ValueError(f"distiller {self.method_name!r} (SAMKD): level {level!r} is {height}x{width}, "
                             f"smaller than its {too_big[0]}x{too_big[0]} pyramid cells; use small_levels='skip' or "
                             f"a pyramid without {too_big}")
        return tuple(n for n in self.pyramid if n not in too_big)

    # -- one pyramid size ---------------------------------------------------------------------------
    def rebuild_spatial(self, level: str, masked: Tensor, valid: Tensor) -> Tensor:
        """``theta_s`` of Eq. 7 on cells ``[B, C, L_h, L_w]``, each on its own: the hidden layer is zeroed
        outside the cell so that the second 3x3 conv, like the first, sees zeros past the cell's border."""
        block = self.spatial_blocks[level]
        return block[2](block[1](block[0](masked)) * valid)

    def cells_of(self, teacher: Tensor, cells: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The ``cells x cells`` pyramid cells of ``teacher [N, C_t, H, W]``: ``rows [n, L_h]``, ``cols [n, L_w]``
        (``cell_index``), ``valid [B, 1, L_h, L_w]`` (1 inside the cell), ``count [B, 1, 1, 1]`` (its pixels)
        and the teacher's cells ``[B, C_t, L_h, L_w]`` (zero outside), ``B = N * n * n``."""
        n_img, _, height, width = teacher.shape
        rows, valid_rows = cell_index(height, cells, teacher.device)
        cols, valid_cols = cell_index(width, cells, teacher.device)
        valid = (valid_rows[:, None, :, None] & valid_cols[None, :, None, :]).to(teacher.dtype)  # [n, n, L_h, L_w]
        valid = valid.flatten(0, 1)[None, :, None].expand(n_img, -1, -1, -1, -1).flatten(0, 1)  # [B, 1, L_h, L_w]
        return rows, cols, valid, valid.sum((2, 3), keepdim=True), split_cells(teacher, rows, cols) * valid

    def cell_masks(self, t: Tensor, valid: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 1-4 on the teacher's cells ``t [B, C, L_h, L_w]``: the spatial attention ``A^s [B, 1, L_h, L_w]``
        and the masks ``M^s [B, 1, L_h, L_w]`` and ``M^c [B, C, 1, 1]`` (0 = masked)."""
        attention = spatial_attention(t, valid, count, self.tau, self.spatial_norm)
        keep_s = (attention < self.omega_s).to(t.dtype)
        keep_c = (channel_attention(t, count, self.tau) < self.omega_c).to(t.dtype)
        return attention, keep_s, keep_c

    def scale_terms(self, level: str, cells: int, aligned: Tensor, teacher: Tensor, s_logits: Tensor,
                    t_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 1-12 for one pyramid size ``cells`` (``n x n`` cells) on one level, summed over images and cells.

        ``aligned`` ``Theta(F^S)`` and ``teacher`` are ``[N, C_t, H, W]``; the logits ``[N, A*K, H, W]``.
        Returns the unweighted ``(sum_R |F^T - F_rec|^2, sum_R W D)``, scalars.
        """
        rows, cols, valid, count, t = self.cells_of(teacher, cells)
        s = split_cells(aligned, rows, cols) * valid
        # Eq. 1-4: the teacher's masks (0 = masked)
        _, keep_s, keep_c = self.cell_masks(t, valid, count)
        # Eq. 5-8
        rebuilt = (self.lambda_s * self.rebuild_spatial(level, s * keep_s, valid)
                   + self.mu_c * self.channel_blocks[level](s * keep_c))
        feature = ((t - rebuilt).square() * valid).sum()
        # Eq. 11
        dot = (t * s).sum((1, 2, 3))
        norms = (t.square().sum((1, 2, 3)) * s.square().sum((1, 2, 3))).clamp_min(COSINE_EPS**2).sqrt()
        weight = 1 - dot / norms
        if self.detach_weight:
            weight = weight.detach()
        # Eq. 9-10, 12
        z_t = F.adaptive_avg_pool2d(t_logits, cells).permute(0, 2, 3, 1).flatten(0, 2)  # [B, A*K]
        z_s = F.adaptive_avg_pool2d(s_logits, cells).permute(0, 2, 3, 1).flatten(0, 2)
        if self.divergence == "binary":
            div = binary_kl(z_t, z_s, self.kl_temperature)
        else:
            div = softmax_kl(z_t, z_s, self.kl_temperature, self.num_anchors)
        return feature, (weight * div).sum()

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """Eq. 13's KD part, summed over levels: ``feature = alpha L_Feat`` (Eq. 8), ``logit = beta L_Logit`` (Eq. 12).

        Loops over levels and pyramid sizes (at most three); the cells of a size are one batch.
        """
        features, logits = [], []
        for lvl in self.levels:
            teacher = inputs.teacher_feats[lvl]
            aligned = self.align[lvl](inputs.student_feats[lvl])
            s_logits = inputs.student_head[lvl][HEAD_KEY]
            t_logits = inputs.teacher_head[lvl][HEAD_KEY].detach()
            n_img, channels, height, width = teacher.shape
            parts = [self.scale_terms(lvl, n, aligned, teacher, s_logits, t_logits)
                     for n in self.level_pyramid(lvl, height, width)]
            norm = n_img * (channels * height * width if self.feature_norm == "mean" else 1)
            features.append(torch.stack([f for f, _ in parts]).sum() / norm)
            logits.append(torch.stack([g for _, g in parts]).sum() / n_img)
        return {"feature": self.alpha * torch.stack(features).sum(), "logit": self.beta * torch.stack(logits).sum()}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """Per pyramid size ``n`` (``cell_masks`` on the teacher's cells), each level ``[N, H, W]``:

        * ``spatial attention nxn``: Eq. 1's ``A^s``, normalised within each of the ``n x n`` cells
          (``spatial_norm``);
        * ``spatial mask nxn``: Eq. 3's ``M^s`` (0 where ``A^s >= omega_s``: the cells the student
          must rebuild; 1 elsewhere).

        Where neighbouring cells share a row or column (``n`` does not divide a side) a pixel shows the
        mean over its cells (``merge_cells``). A level smaller than ``n`` (skipped by the loss) is absent
        from that size's maps. The channel masks ``M^c`` weight channels, not pixels: they are not maps.
        """
        maps: dict[str, dict[str, Tensor]] = {}
        for lvl in self.levels:
            teacher = inputs.teacher_feats[lvl]
            size = tuple(teacher.shape[2:])
            for n in self.level_pyramid(lvl, *size):
                rows, cols, valid, count, t = self.cells_of(teacher, n)
                attention, keep_s, _ = self.cell_masks(t, valid, count)
                maps.setdefault(f"spatial attention {n}x{n}", {})[lvl] = merge_cells(attention, rows, cols, valid, size)
                maps.setdefault(f"spatial mask {n}x{n}", {})[lvl] = merge_cells(keep_s, rows, cols, valid, size)
        return maps
