"""ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation (Lan and Tian).

The paper has no public code; every equation below is the paper's (Eq. 2-9) and every choice the
paper leaves open is an option of ``ACAMDistiller``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..utils.options import PositiveInt, Range, Weight
from .base import FeatureDistiller, KDInputs
from .ops import dice_coeff
from .registry import register_distiller

ChannelUnits = Literal["scalar", "vector"]
Detach = Literal["none", "student"]
DiceMasks = Literal["both", "channel", "spatial"]
DiceForm = Literal["ratio", "pairwise"]
LevelReduction = Literal["sum", "mean"]
BatchReduction = Literal["image", "pooled"]


def mask_diversity(masks: Tensor) -> Tensor:
    """Eq. 8 per image, averaged over images: ``2 sum_{i != j} M_i . M_j / (sum_i |M_i|^2 + sum_j |M_j|^2)``.

    ``masks`` is ``[N, M, D]`` (D: the channels or the cells of one mask); returns a scalar. Both sums of
    the denominator run over all M masks, so per image this is ``sum_{i != j} M_i . M_j / sum_i |M_i|^2``
    (0 for orthogonal masks, ``M - 1`` for identical ones). Sigmoid masks are positive, so the
    denominator is too.
    """
    gram = masks @ masks.transpose(1, 2)  # [N, M, M]: M_i . M_j
    norms = torch.diagonal(gram, dim1=1, dim2=2).sum(dim=1)  # [N]: sum_i |M_i|^2
    return ((gram.sum(dim=(1, 2)) - norms) / norms).mean()


def _pointwise(weight: Tensor, x: Tensor) -> Tensor:
    """A 1x1 conv without bias, ``[O, C]`` by ``[N, C, L]`` -> ``[N, O, L]``, as one batched matmul
    (``weight @ x`` would keep a transposed copy of ``x`` for its backward)."""
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)


def _attention_rows(teacher_rows: Tensor, query_weight: Tensor, query_bias: Tensor, key: Tensor,
                    blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 2-3 for R query cells of one image, in place: the scaled queries ``Q / sqrt(C_q)`` ``[R, C_q]``,
    the scores ``Q K / sqrt(C_q)`` and the rows of ``A`` (``[R, HW]`` each, views of ``blocks``), from the
    teacher features of the cells ``[C, R]``, ``W_q`` ``[C_q, C]``, ``b_q`` and ``K`` ``[C_q, HW]``.

    ``blocks`` is ``[2, R_max * HW]``, reused by every block of a pass: a fresh tensor per block costs
    its page faults, about a third of the time of the scores' product.
    """
    rows, cells = teacher_rows.shape[1], key.shape[1]
    scores, attention = (b[:rows * cells].view(rows, cells) for b in blocks)
    q = torch.addmm(query_bias[:, None], query_weight, teacher_rows).T  # Eq. 2: Q
    q = q / math.sqrt(q.shape[-1])
    torch.softmax(torch.mm(q, key, out=scores), dim=-1, out=attention)  # Eq. 3
    return q, scores, attention


class BlockedAttention(torch.autograd.Function):
    """``A value`` and ``A^T 1`` for ``A = softmax(Q K / sqrt(C_q))`` (Eq. 2-3), R query cells of one image at a time.

    ``forward(teacher, query_weight, query_bias, key, value, rows)`` takes ``F^T`` ``[N, C, HW]``, ``W_q``,
    ``b_q``, ``K`` ``[N, C_q, HW]`` and a value ``[N, HW, M]``, and returns ``A value`` ``[N, HW, M]`` and
    the column sums of ``A`` ``[N, HW]``. Only one block of rows of one image's ``A`` (``[R, HW]``)
    exists at a time, in both passes: backward forms each block again and adds its share of every
    gradient in place, so memory does not grow with the number of blocks (per-block autograd records,
    as ``torch.utils.checkpoint`` keeps, fragment the CPU heap by about one ``[N, HW]`` tensor per block).

    Each pass holds two ``[R, HW]`` buffers (``_attention_rows``), and backward passes over them as few
    times as it can: with ``G`` the gradient of ``A value`` and ``g`` that of ``A^T 1``, the gradient of
    ``A`` is ``dA_pq = G_p . value_q + g_q``, so the softmax backward's row term
    ``r_p = sum_q A_pq dA_pq = G_p . (A value)_p + (A g)_p`` reads the saved output and one
    matrix-vector product, and ``dS = A (dA - r)`` is formed in the scores' buffer.
    """

    @staticmethod
    def forward(ctx, teacher: Tensor, query_weight: Tensor, query_bias: Tensor, key: Tensor, value: Tensor,
                rows: int) -> tuple[Tensor, Tensor]:
        n, _, cells = teacher.shape
        out = value.new_empty(n, cells, value.shape[2])
        column_sums = key.new_zeros(n, cells)
        blocks = key.new_empty(2, min(rows, cells) * cells)
        for i in range(n):
            for start in range(0, cells, rows):
                _, _, attention = _attention_rows(teacher[i, :, start:start + rows], query_weight, query_bias,
                                                  key[i], blocks)
                out[i, start:start + rows] = attention @ value[i]
                column_sums[i] += attention.sum(dim=0)
        ctx.save_for_backward(teacher, query_weight, query_bias, key, value, out)
        ctx.rows = rows
        return out, column_sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_sums: Tensor) -> tuple[Tensor | None, ...]:
        teacher, query_weight, query_bias, key, value, out = ctx.saved_tensors
        n, cells = grad_sums.shape
        grad_key = torch.zeros_like(key)
        grad_value_t = value.new_zeros(n, value.shape[2], cells)  # [N, M, HW]: A^T G, transposed
        grad_weight, grad_bias = torch.zeros_like(query_weight), torch.zeros_like(query_bias)
        grad_teacher = torch.zeros_like(teacher) if ctx.needs_input_grad[0] else None
        scale = 1.0 / math.sqrt(key.shape[1])
        blocks = key.new_empty(2, min(ctx.rows, cells) * cells)
        for i in range(n):
            for start in range(0, cells, ctx.rows):
                rows = teacher[i, :, start:start + ctx.rows]  # [C, R]
                q, scores, attention = _attention_rows(rows, query_weight, query_bias, key[i], blocks)
                grad_rows_out = grad_out[i, start:start + ctx.rows]  # [R, M]
                grad_value_t[i].addmm_(grad_rows_out.T, attention)
                # softmax backward: dS = A (dA - r), r_p = G_p . (A value)_p + (A g)_p, in the scores' buffer
                row_term = (grad_rows_out * out[i, start:start + ctx.rows]).sum(dim=1, keepdim=True)
                row_term.addmm_(attention, grad_sums[i, :, None])  # [R, 1]
                grad_scores = torch.sub(grad_sums[i], row_term, out=scores)
                grad_scores.addmm_(grad_rows_out, value[i].T).mul_(attention)
                grad_key[i].addmm_(q.T, grad_scores)  # scores = (Q / sqrt(C_q)) K
                grad_q = (grad_scores @ key[i].T).mul_(scale)  # [R, C_q], w.r.t. the unscaled Q
                grad_weight.addmm_(grad_q.T, rows.T)
                grad_bias += grad_q.sum(dim=0)
                if grad_teacher is not None:
                    grad_teacher[i, :, start:start + ctx.rows] = query_weight.T @ grad_q.T
        return grad_teacher, grad_weight, grad_bias, grad_key, grad_value_t.transpose(1, 2), None


class SquaredErrorSums(torch.autograd.Function):
    """``D^2 = (F^T - f_align(F^S))^2`` summed over channels and over cells: all that Eq. 6-7 read of ``D``.

    ``forward(teacher, aligned)`` takes ``[N, C, HW]`` each and returns ``[N, HW]`` and ``[N, C]`` in at
    least float32 (sums over HW overflow half precision). It keeps only its inputs for the backward
    pass, which forms ``D`` once more instead of keeping ``D`` or ``D^2``.
    """

    @staticmethod
    def forward(ctx, teacher: Tensor, aligned: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(teacher, aligned)
        sq = (teacher.to(torch.promote_types(teacher.dtype, torch.float32)) - aligned).square_()
        return sq.sum(dim=1), sq.sum(dim=2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cells: Tensor, grad_channels: Tensor) -> tuple[Tensor | None, Tensor]:
        teacher, aligned = ctx.saved_tensors
        # d/dS of sum_{k,p} D^2 w_kp = -2 D w, with D = T - S and w_kp = g_cells_p + g_channels_k, formed for
        # a few channels at a time so that no second [N, C, HW] tensor exists
        grad = aligned.to(grad_cells.dtype) - teacher
        for part, channels in zip(grad.split(16, dim=1), grad_channels.split(16, dim=1), strict=True):
            part.mul_(grad_cells[:, None, :] + channels[:, :, None])
        grad.mul_(2)
        teacher_grad = -grad.to(teacher.dtype) if ctx.needs_input_grad[0] else None
        return teacher_grad, grad.to(aligned.dtype)


class CooperativeMasking(nn.Module):
    """STCA-FF and ASCM of one FPN level (Sec. 3.1-3.2): the fusion projections and the selection units.

    Args:
        channels: C (the teacher's; the student side is aligned first).
        num_masks: M.
        channel_units: ``"scalar"``: ``m^c`` in ``R^M`` as the paper writes it, so
            ``M^c_{m,k} = sigmoid(m^c_m v_k)`` (an outer product); ``"vector"``: ``m^c`` in ``R^{M x C}``,
            ``M^c_{m,k} = sigmoid(m^c_{m,k} v_k)``.

    ``W_q``, ``W_k`` (``C -> C_q = C // 2``, at least 1) and ``W_v`` (``C -> C``) are the 1x1 convs of
    Eq. 2, kept as ``nn.Linear`` (the same map and initialisation; applied as ``W x + b`` to ``[N, C, HW]``
    features). The units start from N(0, 0.01) (assumption: MasKD's token init; the paper gives none),
    so every mask starts near 0.5.
    """

    def __init__(self, channels: int, num_masks: int, channel_units: ChannelUnits) -> None:
        super().__init__()
        reduced = max(channels // 2, 1)
        self.query = nn.Linear(channels, reduced)
        self.key = nn.Linear(channels, reduced)
        self.value = nn.Linear(channels, channels)
        unit_shape = (num_masks,) if channel_units == "scalar" else (num_masks, channels)
        self.channel_units = nn.Parameter(torch.empty(unit_shape).normal_(0, 0.01))
        self.spatial_units = nn.Parameter(torch.empty(num_masks, channels).normal_(0, 0.01))

    def fused_masks(self, teacher: Tensor, aligned: Tensor, rows_per_block: int) -> tuple[Tensor, Tensor]:
        """Eq. 2-5: the channel masks ``M^c`` ``[N, M, C]`` and the spatial masks ``M^s`` ``[N, M, HW]``.

        Args:
            teacher: ``[N, C, HW]`` ``F^T``.
            aligned: ``[N, C, HW]`` ``f_align(F^S)``, which K and V read.
            rows_per_block: query cells per block of ``A``.

        Neither ``F_fused = A V`` (Eq. 4, ``[N, C, HW]``) nor the HW x HW ``A`` is formed: the masks read
        ``F_fused`` only through ``m^s . z`` and ``v = mean_HW F_fused``, and since each row of ``A``
        sums to 1, ``m^s . z_p = sum_q A_pq (m^s W_v f_align(F^S)_q) + m^s b_v`` and
        ``v = W_v f_align(F^S) (A^T 1) / HW + b_v``. So each block of one image's query cells forms its
        rows of ``A`` (rows x HW) and keeps only ``[R, M]`` and the column sums ``[HW]``; the
        backward pass forms each block again (``BlockedAttention``). The attention's value is M wide,
        not C, and no block outlives its use.
        """
        cells = aligned.shape[2]
        key = _pointwise(self.key.weight, aligned) + self.key.bias[:, None]  # Eq. 2: K, [N, C_q, HW]
        spatial_weight = self.spatial_units @ self.value.weight  # m^s W_v: [M, C]
        spatial_value = _pointwise(spatial_weight, aligned).transpose(1, 2)  # [N, HW, M]
        wide = torch.promote_types(key.dtype, torch.float32)
        with torch.autocast(aligned.device.type, enabled=False):  # a softmax over HW cells: at least float32
            attention_inputs = (teacher, self.query.weight, self.query.bias, key, spatial_value)
            logits, attended = BlockedAttention.apply(*(t.to(wide) for t in attention_inputs),
                                                      rows_per_block)  # [N, HW, M] and A^T 1: [N, HW]
        spatial_bias = self.spatial_units @ self.value.bias  # m^s b_v: [M]
        spatial = torch.sigmoid(logits.transpose(1, 2) + spatial_bias[:, None])  # Eq. 5: [N, M, HW]
        pooled = self.value((aligned @ attended[:, :, None])[..., 0] / cells)  # v = mean_HW F_fused: [N, C]
        units = self.channel_units if self.channel_units.dim() == 2 else self.channel_units[:, None]
        channel = torch.sigmoid(units[None] * pooled[:, None, :])  # Eq. 5: sigma(m^c . v), [N, M, C]
        return channel, spatial


@register_distiller("acam", label="ACAM-KD")
class ACAMDistiller(FeatureDistiller):
    """ACAM-KD: cross-attention fusion of teacher and student, adaptive channel and spatial masks.

    Per FPN level, with ``F^T`` the teacher feature and ``f_align(F^S)`` the aligned student
    (``[N, C, H, W]``), the terms of Eq. 9 are

    * ``channel``: ``alpha * L^c_distill`` (Eq. 6),
      ``(1/M) sum_m ||M^c_m (F^T - f_align(F^S))||^2 / (HW sum_k M^c_{m,k})``;
    * ``spatial``: ``alpha * L^s_distill`` (Eq. 7),
      ``(1/M) sum_m ||M^s_m (F^T - f_align(F^S))||^2 / (C sum_p M^s_{m,p})``;
    * ``div``: ``lambda_div * L_div`` (Eq. 8, Dice diversity of the masks).

    The masks come from ``F_fused = softmax(Q K / sqrt(C_q)) V`` (Eq. 2-4: Q from the teacher, K and
    V from the student, 1x1 projections, ``C_q = C / 2``) through ``sigmoid(m^c . v)`` and
    ``sigmoid(m^s . z)`` (Eq. 5; ``v`` the spatial mean of ``F_fused``, ``z`` its flattened cells).
    Everything learns in the one distillation stage, jointly with the student ("our approach learns
    masks adaptively and continuously throughout the KD process", Sec. 3; "dynamically generates
    feature importance masks during distillation", Sec. 3.2): ``two_stage`` is False.

    What the paper leaves open, and the choice made:

    * Eq. 2 writes ``K = W_k F^S`` with ``F^S`` of C channels; K and V read the aligned student
      ``f_align(F^S)`` (the tensor Eq. 6-7 compare), so ``W_k``, ``W_v`` are ``C_t``-wide.
    * The sum of Eq. 9 is minimised over everything, with no stop-gradient stated: by default
      (``detach="none"``) the fused feature, and through it the masks, carry gradient into the student
      and ``f_align``. Note that the masks sit squared in the numerator and once in the denominator,
      so the distillation terms alone favour small masks.
    * Eq. 5's ``m^c in R^M`` times ``v in R^{1 x C}`` gives ``M^c in R^{M x C}`` only as an outer
      product (``channel_units="scalar"``); ``"vector"`` is the per-channel reading.
    * Eq. 8 is written for "a set of learnable masks" after both sets are defined and Eq. 9 has one
      ``L_div``: by default (``dice_masks="both"``) the term is the sum of Eq. 8 over the channel and
      over the spatial masks; Sec. 5.4 and Fig. 3 speak of the spatial masks only (``"spatial"``).
      Eq. 8 is one ratio of sums (``dice_form="ratio"``, the default); ``"pairwise"`` is MasKD's public
      ``dice_coeff`` (the mean over pairs of ``2 a.b / (a.a + b.b)``), which the paper's name for the
      loss suggests.
    * The equations are per image: ``batch_reduction="image"`` averages each image's Eq. 6-7 over
      the batch; ``"pooled"`` sums numerators and normalisers over the batch first. Eq. 8 is always
      averaged over images. Levels: summed (``level_reduction="sum"``, as MasKD and FGD sum their FPN
      losses) or averaged.
    * One fusion module and one set of units per level (assumption, as MasKD keeps one mask module per
      level).

    Args (beyond ``FeatureDistiller``'s):
        alpha: alpha of Eq. 9 (paper: 1).
        lambda_div: lambda of Eq. 9 (paper: 1).
        num_masks: M, for both the channel and the spatial masks (paper: 6 for detection); at least 2.
        projector: learn ``f_align``, a 1x1 conv per level (also where the channels agree, as MasKD's
            align module); without it the channels must agree.
        channel_units, detach, dice_masks, dice_form, batch_reduction, level_reduction: see above;
            ``detach="student"`` feeds K and V a detached ``f_align(F^S)``, so the student and
            ``f_align`` learn from the masked difference only while the fusion and units still learn.
        max_attention_elements: the most elements of one block of rows of ``A`` (query cells x HW, of
            one image; the HW x HW ``A`` is never formed, see ``CooperativeMasking.fused_masks``). Blocks
            take as many query cells as fit (2^20: 4 MiB in float32, 68 cells at P3 of an 800 x 1216
            input); a level where even one query cell does not fit is a ``ValueError``.
    """

    @dataclass(frozen=True)
    class Options(FeatureDistiller.Options):
        alpha: Weight = 1.0
        lambda_div: Weight = 1.0
        num_masks: Annotated[int, Range(ge=2)] = 6  # the diversity term compares pairs
        projector: bool = True
        channel_units: ChannelUnits = "scalar"
        detach: Detach = "none"
        dice_masks: DiceMasks = "both"
        dice_form: DiceForm = "ratio"
        batch_reduction: BatchReduction = "image"
        level_reduction: LevelReduction = "sum"
        max_attention_elements: PositiveInt = 2**20

    def build(self) -> None:
        self.projectors = self.make_projectors(self.projector)
        self.masking = nn.ModuleDict({
            lvl: CooperativeMasking(self.teacher_channels[lvl], self.num_masks, self.channel_units)
            for lvl in self.levels
        })

    def rows_per_block(self, level: str, cells: int) -> int:
        """Query cells per block of ``A`` at ``level``: as many as keep the block (rows x ``cells``, of one
        image) within ``max_attention_elements``."""
        rows = min(cells, self.max_attention_elements // max(cells, 1))
        if rows < 1:
            raise ValueError(
                f"{self.label} level {level!r}: the attention over {cells} cells needs {cells} elements per "
                f"query cell, more than max_attention_elements={self.max_attention_elements}; distil a coarser "
                f"level or raise max_attention_elements")
        return rows

    def masked_losses(self, channel: Tensor, spatial: Tensor, cell_sq: Tensor,
                      channel_sq: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 6 and Eq. 7 of one level: ``(L^c, L^s)``, scalars.

        ``channel`` ``[N, M, C]`` and ``spatial`` ``[N, M, HW]`` are the masks; ``cell_sq`` ``[N, HW]`` and
        ``channel_sq`` ``[N, C]`` the squared difference summed over channels and over cells. A mask
        constant over cells (channels) factors out of the norm, so
        ``||M^c_m D||^2 = sum_k (M^c_{m,k})^2 sum_p D_{k,p}^2`` and likewise for ``M^s``.
        """
        cells, channels = cell_sq.shape[1], channel_sq.shape[1]
        parts = []
        for masks, sq, size in ((channel, channel_sq, cells), (spatial, cell_sq, channels)):
            numerator = (masks.square() @ sq[:, :, None])[..., 0]  # [N, M]
            normaliser = size * masks.sum(dim=2)  # [N, M]
            if self.batch_reduction == "image":
                parts.append((numerator / normaliser).mean())
            else:
                parts.append((numerator.sum(dim=0) / normaliser.sum(dim=0)).mean())
        return parts[0], parts[1]

    def diversity(self, channel: Tensor, spatial: Tensor) -> Tensor:
        """``L_div`` of one level (Eq. 8 or ``dice_coeff``) over the masks ``dice_masks`` names."""
        form = mask_diversity if self.dice_form == "ratio" else dice_coeff
        chosen = {"both": (channel, spatial), "channel": (channel,), "spatial": (spatial,)}[self.dice_masks]
        return torch.stack([form(masks) for masks in chosen]).sum()

    def level_masks(self, level: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 2-5 of one level: ``f_align(F^S)`` ``[N, C, HW]``, the channel masks ``M^c`` ``[N, M, C]`` and
        the spatial masks ``M^s`` ``[N, M, HW]``, for ``student`` ``[N, C_s, H, W]`` and ``teacher``
        ``[N, C_t, H, W]`` (``CooperativeMasking.fused_masks``, blockwise)."""
        rows = self.rows_per_block(level, teacher.shape[2] * teacher.shape[3])
        aligned = self.projectors[level](student).flatten(2)  # f_align(F^S): [N, C, HW]
        key_value = aligned.detach() if self.detach == "student" else aligned
        channel, spatial = self.masking[level].fused_masks(teacher.flatten(2), key_value, rows)
        return aligned, channel, spatial

    def level_terms(self, level: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L^c, L^s, L_div)`` of one level (Eq. 2-8) for ``student`` ``[N, C_s, H, W]`` and ``teacher``
        ``[N, C_t, H, W]``."""
        aligned, channel, spatial = self.level_masks(level, student, teacher)
        teacher = teacher.flatten(2)
        with torch.autocast(teacher.device.type, enabled=False):  # sums over HW overflow half precision
            cell_sq, channel_sq = SquaredErrorSums.apply(teacher, aligned)
            channel, spatial = channel.to(cell_sq.dtype), spatial.to(cell_sq.dtype)
            loss_c, loss_s = self.masked_losses(channel, spatial, cell_sq, channel_sq)
            return loss_c, loss_s, self.diversity(channel, spatial)

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        """Eq. 9 without the task loss: ``channel`` and ``spatial`` (times ``alpha``) and ``div`` (times
        ``lambda_div``), each reduced over levels by ``level_reduction``."""
        s, t = inputs.student_feats, inputs.teacher_feats
        per_level = torch.stack([torch.stack(self.level_terms(lvl, s[lvl], t[lvl])) for lvl in self.levels])
        total = per_level.sum(dim=0) if self.level_reduction == "sum" else per_level.mean(dim=0)
        return {"channel": self.alpha * total[0], "spatial": self.alpha * total[1], "div": self.lambda_div * total[2]}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """``spatial mask m`` (m = 1..M): Eq. 5's spatial masks ``M^s_m``, which weight Eq. 7, each level
        ``[N, H, W]`` (``level_masks``: the loss's blockwise attention, one block of query rows at a
        time; ``weight_maps`` runs it under ``no_grad``, so no graph is kept). The channel masks ``M^c``
        weight channels, not cells: they are not maps.
        """
        maps: dict[str, dict[str, Tensor]] = {}
        for lvl in self.levels:
            teacher = inputs.teacher_feats[lvl]
            _, _, spatial = self.level_masks(lvl, inputs.student_feats[lvl], teacher)
            spatial = spatial.unflatten(2, teacher.shape[2:])  # [N, M, H, W]
            for m in range(self.num_masks):
                maps.setdefault(f"spatial mask {m + 1}", {})[lvl] = spatial[:, m]
        return maps
