"""Training and evaluation: the loop, the recipe's steps, checkpoints and COCO metrics."""

from ..utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluate import coco_metrics, evaluate_coco, predict_coco
from .loop import FitResult, TrainConfig, fit
from .recipes import distill, inherit_neck_and_head, learn_stage1, stage1_stats, train_detector, train_student
from .steps import DetectorStep, DistillStep, Stage1Step, freeze

__all__ = [
    "CheckpointError", "DetectorStep", "DistillStep", "FitResult", "Stage1Step", "TrainConfig", "coco_metrics",
    "distill", "evaluate_coco", "fit", "freeze", "inherit_neck_and_head", "learn_stage1", "load_checkpoint", "stage1_stats",
    "predict_coco", "save_checkpoint", "train_detector", "train_student",
]
