"""Watching a run: per-adapter step rows and run rows, the sinks they flow to
(``D/metrics.jsonl``, TensorBoard / MLflow / Trackio / W&B, the progress bar) and the plots and
readers over the metrics file.
"""
