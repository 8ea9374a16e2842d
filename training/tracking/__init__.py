"""MLflow: runs, the model registry, the pyfunc model and the model card."""
