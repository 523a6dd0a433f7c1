"""Shared inputs and checks of the tests (and of benchmarks/bench_liaf_loss.py): random boxes, the two-level
test features, seeded generators, and assertions on draws, gradients and gradcheck. The methods' literal
references are in ``tests/references/``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor


# -- random test data (shared by the tests and the benchmark) ------------------------------------------
def random_boxes(
    gen: torch.Generator,
    count: int,
    image_size: tuple[float, float],
    min_side: float = 1.0,
    max_side: float | None = None,
    overhang: float = 0.15,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``count`` valid (x1, y1, x2, y2) boxes with fractional coordinates and varied sizes.

    Boxes may overhang the image border by up to ``overhang`` of the image size, so some touch or
    cross it. ``max_side`` defaults to the image's shorter side.
    """
    img_h, img_w = image_size
    max_side = min(img_h, img_w) if max_side is None else max_side
    u = torch.rand(count, 4, generator=gen, dtype=torch.float64)
    # log-uniform sides give a spread of small and large instances
    lo, hi = torch.log(torch.tensor(min_side)), torch.log(torch.tensor(float(max_side)))
    bw = torch.exp(lo + (hi - lo) * u[:, 2])
    bh = torch.exp(lo + (hi - lo) * u[:, 3])
    x1 = -overhang * img_w + u[:, 0] * ((1 + 2 * overhang) * img_w - bw)
    y1 = -overhang * img_h + u[:, 1] * ((1 + 2 * overhang) * img_h - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1).to(dtype)


# -- shared test inputs of the distiller tests ---------------------------------------------------------
STRIDES = {"p3": 4.0, "p4": 8.0}
IMAGE = (32.0, 40.0)  # (H, W) pixels: p3 is 8 x 10, p4 is 4 x 5 (non-square, so [h, w] vs [w, h] shows)
SIZES = {"p3": (8, 10), "p4": (4, 5)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_feats(channels: int, n: int, seed: int, strides: Mapping[str, float] = STRIDES, requires_grad: bool = False,
               dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """``{level: [n, channels, *SIZES[level]]}`` standard normal features for the levels of ``strides``."""
    g = gen(seed)
    return {lvl: torch.randn(n, channels, *SIZES[lvl], generator=g, dtype=dtype).requires_grad_(requires_grad)
            for lvl in strides}


def make_boxes(counts: Sequence[int], seed: int = 0, min_side: float = 3.0) -> list[Tensor]:
    """One ``[count, 4]`` float64 box tensor per image on an ``IMAGE`` input (``random_boxes``)."""
    g = gen(seed)
    return [random_boxes(g, n, IMAGE, min_side=min_side, dtype=torch.float64) for n in counts]


def assert_seeded_draws(distiller: Callable[..., Tensor], student: Mapping[str, Tensor], teacher: Mapping[str, Tensor],
                        boxes: Sequence[Tensor]) -> None:
    """A method that draws random numbers: the same generator seed gives the same loss bit for bit,
    another seed another loss."""
    with torch.no_grad():
        a = distiller(student, teacher, boxes, generator=gen(123))
        b = distiller(student, teacher, boxes, generator=gen(123))
        c = distiller(student, teacher, boxes, generator=gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def assert_default_generator_draws(distiller: Callable[..., Tensor], student: Mapping[str, Tensor],
                                   teacher: Mapping[str, Tensor], boxes: Sequence[Tensor],
                                   reference: Callable[[], Tensor]) -> None:
    """Without a generator the draws come from torch's default one: reseeding it repeats the loss,
    which equals ``reference()`` run after the same reseed."""
    with torch.no_grad():
        torch.manual_seed(42)
        a = distiller(student, teacher, boxes)
        torch.manual_seed(42)
        b = distiller(student, teacher, boxes)
        torch.manual_seed(42)
        want = reference()
    assert torch.equal(a, b)
    torch.testing.assert_close(a, want)


def assert_loss_and_grads_close(loss: Tensor, want: Tensor, wrt: Sequence[Tensor]) -> None:
    """``loss`` equals its reference ``want``, and so do their gradients in each tensor of ``wrt``."""
    torch.testing.assert_close(loss, want)
    for got, ref in zip(torch.autograd.grad(loss, wrt, retain_graph=True), torch.autograd.grad(want, wrt), strict=True):
        torch.testing.assert_close(got, ref)


def feature_gradcheck(distiller: torch.nn.Module, student_c: int, teacher_c: int) -> bool:
    """``torch.autograd.gradcheck`` of a features-only distiller (float64, one level ``p4``, two images) in
    the student's features and every parameter of the distiller."""
    level = {"p4": 8.0}
    student = make_feats(student_c, 2, seed=1, strides=level, requires_grad=True)["p4"]
    teacher = make_feats(teacher_c, 2, seed=2, strides=level)
    params = [p.detach().clone().requires_grad_(True) for p in distiller.parameters()]
    names = [n for n, _ in distiller.named_parameters()]

    def loss(s: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(distiller, dict(zip(names, ps, strict=True)), ({"p4": s}, teacher, [torch.zeros(0, 4)] * 2))

    return torch.autograd.gradcheck(loss, (student, *params), eps=1e-6, atol=1e-5)
