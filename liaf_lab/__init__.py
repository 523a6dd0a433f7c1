"""liaf_lab: learn, run and analyse knowledge distillation of object detectors, centred on LIAF-KD."""

from .utils.version import __version__ as __version__  # written once, in utils/version.py

from .utils._ops_check import TorchvisionOpsError, check_torchvision_ops

check_torchvision_ops()

from .distillers import (  # noqa: E402
    FeatureDistiller,
    FitNetDistiller,
    KDInputs,
    LIAFDistiller,
    create_distiller,
    feature_mse,
    list_distillers,
    register_distiller,
    register_variant,
)
from .engine import TrainConfig, distill, evaluate_coco, learn_stage1, stage1_stats, train_detector  # noqa: E402
from .distillers.instance import InstanceSelectors, diversity_loss, instance_mask, roi_instance_features, score_entropy  # noqa: E402
from .models import create_detector, fpn_strides, save_detector  # noqa: E402
from .experiments.study import StudyRun, load_study_run, run_study  # noqa: E402
from .experiments.report import StudySummary, load_study_summary  # noqa: E402
from .utils.validation import set_debug  # noqa: E402

__all__ = [
    "TrainConfig", "create_detector", "distill", "evaluate_coco", "fpn_strides", "learn_stage1", "stage1_stats", "train_detector",
    "FeatureDistiller", "FitNetDistiller", "InstanceSelectors", "KDInputs", "LIAFDistiller", "TorchvisionOpsError",
    "check_torchvision_ops", "create_distiller", "diversity_loss", "feature_mse", "instance_mask",
    "list_distillers", "register_distiller", "register_variant", "roi_instance_features", "run_study", "StudyRun", "StudySummary", "load_study_run", "load_study_summary", "score_entropy", "save_detector", "set_debug",
]
