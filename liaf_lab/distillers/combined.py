"""A sum of distillers (``create_distiller("liaf+maskd")``): the LIAF-KD paper's hybrid rows."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import FeatureDistiller, KDInputs, Stage1Output


class CombinedDistiller(FeatureDistiller):
    """Each part's loss terms, summed; each part's stage 1 (if any) in the same stage-1 step.

    Terms are named ``<part>_<term>`` (``<part>`` alone when the term carries the part's name). The
    parts share levels and channels; each keeps its own modules (e.g. its own projector).
    """

    def __init__(self, parts: dict[str, FeatureDistiller]) -> None:
        first = next(iter(parts.values()))
        super().__init__(first.student_channels, first.teacher_channels, first.strides)
        self.parts = nn.ModuleDict(parts)
        self.method_name = "+".join(parts)
        self.label = " + ".join(p.label for p in parts.values())
        self.needs = frozenset().union(*(p.needs for p in parts.values()))
        self.head_keys = tuple(dict.fromkeys(k for p in parts.values() for k in p.head_keys))
        splits = {p.split_index for p in parts.values() if "head_split" in p.needs}
        if len(splits) > 1:
            raise ValueError(f"the parts of {self.method_name!r} split the heads at different convs {sorted(splits)}; "
                             "give them one split")
        self.split_index = splits.pop() if splits else 0

    @property
    def two_stage(self) -> bool:
        return any(p.two_stage for p in self.parts.values())

    @property
    def stage1_ready(self) -> bool:
        return all(p.stage1_ready for p in self.parts.values())

    def mark_stage1(self, iterations: int) -> None:
        for part in self.parts.values():
            part.mark_stage1(iterations)

    def _copy_stage1_count(self, other: FeatureDistiller) -> None:
        for name, part in self.parts.items():
            part._copy_stage1_count(other.parts[name])

    @staticmethod
    def _name(part: str, term: str) -> str:
        return part if term == part else f"{part}_{term}"

    def compute_terms(self, inputs: KDInputs) -> dict[str, Tensor]:
        return {self._name(name, k): v for name, part in self.parts.items()
                for k, v in part.compute_terms(inputs).items()}

    def compute_weight_maps(self, inputs: KDInputs) -> dict[str, dict[str, Tensor]]:
        """Each part's maps, named ``<part>_<map>`` as the terms are (parts in order, so random draws
        follow ``compute_terms``)."""
        return {self._name(name, k): v for name, part in self.parts.items()
                for k, v in part.compute_weight_maps(inputs).items()}

    def stage2_parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts.values() for p in part.stage2_parameters()]

    def stage1_modules(self) -> dict[str, nn.Module]:
        return {f"{name}.{k}": m for name, part in self.parts.items() for k, m in part.stage1_modules().items()}

    def compute_stage1(self, teacher_feats: dict[str, Tensor], boxes: list[Tensor],
                       labels: Sequence[Tensor] | None) -> Stage1Output:
        views, terms = {}, {}
        for name, part in self.parts.items():
            if part.two_stage:
                out = part.compute_stage1(teacher_feats, boxes, labels)
                views.update(out.views)
                terms.update({self._name(name, k): v for k, v in out.terms.items()})
        return Stage1Output(views, terms)

    def compute_stage1_stats(self, teacher_feats: dict[str, Tensor], boxes: list[Tensor]) -> dict[str, Tensor]:
        return {f"{name}_{k}": v for name, part in self.parts.items()
                for k, v in part.compute_stage1_stats(teacher_feats, boxes).items()}
