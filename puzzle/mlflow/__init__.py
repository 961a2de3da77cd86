"""MLflow: tracking of every phase and the Model Registry (registration and the promotion gate)."""
