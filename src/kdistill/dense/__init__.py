"""Distillation for dense prediction: object detection and semantic segmentation.

- :mod:`kdistill.dense.boxes` — box geometry, decoding, NMS (plain torch);
- :mod:`kdistill.dense.synthetic` — the Fashion-MNIST canvases task, written to disk;
- :mod:`kdistill.dense.formats` — COCO JSON, YOLO txt and image + mask folders (read/write);
- :mod:`kdistill.dense.models` — a CenterNet-style detector with a small FPN, a U-Net segmenter;
- :mod:`kdistill.dense.tasks` — the supervised losses of each task;
- :mod:`kdistill.dense.metrics` — COCO mAP (pycocotools) and mIoU;
- :mod:`kdistill.dense.run` — ``run_dense(cfg)``: teacher, student, student + KD, report.

The distillation losses themselves live with the others in :mod:`kdistill.losses.dense`.
This package imports nothing heavy on import; import the submodules you need.
"""
