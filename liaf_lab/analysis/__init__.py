"""Analysis of distillation: figures, CAMs, efficiency, score histories and an interactive mask inspector.

Every plotting function returns a ``matplotlib.figure.Figure``; library functions raise ``ValueError``
naming the problem for bad input (no boxes, unknown level, a model that is no FPN detector).
"""

from .cam import (
    DetectorCAM, cam_box_share, cam_shares, compare_cams, detector_cam, fpn_features, plot_cam_shares, read_cam_shares,
    resize_for_detector, summarise_cam_shares, write_cam_shares,
)
from .efficiency import (
    count_flops,
    count_parameters,
    efficiency_table,
    format_table,
    kd_step_overhead,
    latency_noise,
    machine_description,
    measure_latency,
    peak_memory,
    plot_efficiency,
    size_table,
)
from .history import ScoreHistory, plot_score_gaps
from .maps import (
    background_area, background_share, box_regions, in_boxes, kd_inputs_for, method_weight_maps, paired_maps,
    plot_weight_maps, study_background_shares, summarise_background_shares, weight_map_summary,
)
from .selectors import instance_groups, mean_cosine, plot_group_values, plot_selector_cosines, selector_cosines
from .viz import (
    draw_boxes,
    draw_mask,
    draw_score_bars,
    figure_digest,
    figure_to_jpeg,
    figure_to_png,
    plot_detections,
    plot_instance_scores,
    plot_masks,
    plot_run_curves,
    plot_training_curves,
)
from .widgets import MaskInspector, MaskView

__all__ = [
    "DetectorCAM", "MaskInspector", "MaskView", "ScoreHistory", "background_area", "background_share", "study_background_shares", "summarise_background_shares",
    "box_regions", "cam_box_share", "cam_shares", "compare_cams", "count_flops", "count_parameters", "detector_cam",
    "draw_boxes", "draw_mask", "draw_score_bars", "efficiency_table", "figure_digest", "figure_to_jpeg",
    "figure_to_png", "format_table", "fpn_features", "in_boxes", "instance_groups", "kd_inputs_for",
    "kd_step_overhead", "latency_noise", "machine_description", "mean_cosine", "measure_latency",
    "method_weight_maps", "paired_maps", "peak_memory", "plot_cam_shares", "plot_detections", "plot_efficiency",
    "plot_group_values", "plot_instance_scores", "plot_masks", "plot_run_curves", "plot_score_gaps",
    "plot_selector_cosines", "plot_training_curves", "plot_weight_maps", "read_cam_shares", "resize_for_detector",
    "selector_cosines", "size_table", "summarise_cam_shares", "weight_map_summary", "write_cam_shares",
]
