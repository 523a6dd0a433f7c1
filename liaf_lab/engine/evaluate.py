"""COCO-style evaluation with pycocotools' COCOeval (bbox)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from collections.abc import Callable

import torch
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..utils.atomic import write_json
from ..data import collate_fn as default_collate
from ..models.detectors import check_image_sizes
from ..utils.progress import progress

METRIC_NAMES = ["AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L"]


@torch.no_grad()
def predict_coco(model: nn.Module, dataset: Dataset, collate_fn: Callable = default_collate, batch_size: int = 8,
                 device: torch.device | str = "cpu", desc: str = "evaluate") -> list[dict]:
    """Run ``model`` in eval mode over ``dataset``; detections as COCO result dicts (xywh boxes)."""
    model.eval().to(device)
    results = []
    # Its own generator: evaluating during training must not draw from the global RNG that training uses.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        generator=torch.Generator())
    for images, targets in progress(loader, desc=desc, leave=False):
        detections = model([im.to(device) for im in images])
        for det, target in zip(detections, targets, strict=True):
            boxes = det["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True):
                if label == 0:  # torchvision's background class (a trained student may still score it): no
                    continue    # category, which COCOeval would ignore anyway
                results.append({"image_id": int(target["image_id"]), "bbox": [round(v, 2) for v in box],
                                "score": round(float(score), 5),
                                "category_id": int(dataset.label_to_cat_id[int(label)])})
    return results


def coco_metrics(coco_gt, results: list[dict]) -> dict[str, float]:
    """AP, AP50, AP75, AP_S/M/L, AR1/10/100, AR_S/M/L (fractions in [0, 1]; -1 where undefined)."""
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(METRIC_NAMES, ev.stats, strict=True)}


def evaluate_coco(model: nn.Module, dataset: Dataset, collate_fn: Callable = default_collate, batch_size: int = 8,
                  device: torch.device | str = "cpu", out_json: str | Path | None = None,
                  desc: str = "evaluate") -> dict[str, float]:
    """Evaluate ``model`` on ``dataset`` (which provides ``coco_gt()`` and ``label_to_cat_id``).

    Writes the metrics to ``out_json`` when given. An image the model cannot take (``check_image_sizes``)
    is a ``ValueError`` naming it before any prediction.
    """
    check_image_sizes(model, dataset)
    results = predict_coco(model, dataset, collate_fn, batch_size, device, desc)
    metrics = coco_metrics(dataset.coco_gt(), results)
    metrics["num_detections"] = len(results)
    if out_json is not None:
        write_json(out_json, metrics)
    return metrics
