"""The CAFE loop: the stage graph (``cafe pipeline plan|run``), evaluation (``cafe eval``), the model registry and
scheduled retraining with a promotion gate (``cafe retrain``, ``cafe models list|promote|rollback``)."""
