"""Feature distillers for FPN detectors, one interface: ``loss = distiller(student_feats, teacher_feats, boxes)``."""

from .base import FeatureDistiller, feature_mse
from .fitnet import FitNetDistiller
from .liaf import LIAFDistiller
from .registry import create_distiller, list_distillers, register_distiller

__all__ = [
    "FeatureDistiller", "FitNetDistiller", "LIAFDistiller", "create_distiller", "feature_mse",
    "list_distillers", "register_distiller",
]
