"""Object detection: boxes per image, through the same stages and gates as classification.

Shared contracts (every module in this package keeps to them):

- Annotations on disk are COCO JSON: `data/raw/annotations.json` lists images (file_name relative to
  `data/raw/images/`, width, height), annotations (image_id, category_id, bbox [x, y, w, h] in pixels) and
  categories (id, name). COCO and YOLO sources and reviewed images are all ingested into this one form.
- Class indices: the model's label k (1-based; 0 is background) names `classes[k - 1]`; classes are sorted names.
- Split and manifest CSVs hold one row per image; the `boxes` column is JSON: [[x, y, w, h, "class"], ...].
- The ONNX graph (model.export_onnx): input `image` uint8 [1, 3, H, W] RGB of any size (resized inside);
  outputs `boxes` float32 [N, 4] (x1, y1, x2, y2 in input pixels), `scores` float32 [N], `labels` int64 [N]
  (1-based), `embedding` float32 [1, D] (the pooled backbone features, for drift). Boxes come sorted by score,
  down to the graph's floor (SCORE_FLOOR); the answer is the boxes at or above detection.score_threshold.
- The model card beside the ONNX file says `"task": "detection"`, with classes, image_size, score_threshold.
"""
