"""Distillers for FPN detectors on one protocol (``base.py``): ``terms = distiller.loss_terms(KDInputs(...))``,
or ``loss = distiller(student_feats, teacher_feats, boxes)`` for methods that need only features and boxes."""

from .base import FeatureDistiller, KDInputs, LossWeights, Stage1Output, feature_cells, feature_mse
from .fgd import FGDDistiller
from .fitnet import FitNetDistiller
from .liaf import InstanceScorer, LIAFDistiller
from .maskd import MasKDDistiller
from .mgd import MGDDistiller
from .acam import ACAMDistiller
from .defeat import DeFeatDistiller
from .fgfi import FGFIDistiller
from .gid import GIDDistiller
from .ima import IMADistiller
from .samkd import SAMKDDistiller
from .pkd import PKDDistiller
from .cwd import CWDDistiller
from .ld import LDDistiller
from .bckd import BCKDDistiller
from .crosskd import CrossKDDistiller
from .combined import CombinedDistiller
from .registry import (
    BASELINE, create_distiller, list_distillers, method_label, method_option_types, method_options, method_parts,
    register_distiller, register_variant, variant_of,
)

__all__ = [
    "ACAMDistiller", "BASELINE", "BCKDDistiller", "CWDDistiller", "CombinedDistiller", "CrossKDDistiller", "DeFeatDistiller", "FGDDistiller", "FGFIDistiller", "FeatureDistiller",
    "FitNetDistiller", "GIDDistiller", "IMADistiller", "InstanceScorer", "KDInputs", "LDDistiller", "LossWeights", "LIAFDistiller", "MGDDistiller",
    "MasKDDistiller", "PKDDistiller", "SAMKDDistiller",
    "Stage1Output", "create_distiller", "feature_cells", "feature_mse", "list_distillers", "method_label", "method_option_types",
    "method_options", "method_parts", "register_distiller", "register_variant", "variant_of",
]
