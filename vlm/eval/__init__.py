"""Evaluation tools for multimodal outputs (hallucination metrics)."""

from mmaccel.vlm.eval.chair import COCO_SYNONYMS, CaptionReport, ChairResult, chair, extract_objects

__all__ = ["COCO_SYNONYMS", "ChairResult", "CaptionReport", "chair", "extract_objects"]
