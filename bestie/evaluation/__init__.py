"""bestie.evaluation: streaming metrics (VOC instance AP, COCO mask AP, semantic mIoU)."""

from bestie.evaluation.coco import coco_segm_eval
from bestie.evaluation.semantic import SemanticEvaluator
from bestie.evaluation.voc import VOCInstanceEvaluator, eval_instance_segmentation_voc, mask_iou, voc_ap

__all__ = [
    "VOCInstanceEvaluator",
    "eval_instance_segmentation_voc",
    "mask_iou",
    "voc_ap",
    "coco_segm_eval",
    "SemanticEvaluator",
]
