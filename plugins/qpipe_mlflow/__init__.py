"""Built-in plugin: MLflow tracking (work in progress)."""
