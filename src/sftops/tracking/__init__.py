"""The one place that talks to MLflow: where runs go (store), the training run (runs), each evaluation as a run of
its own (evaluations), the model logged, loaded back and answered from (models), and the registry with the
promotion gate applied (registry). The logged model's own entry point (served_chat) ships inside the model."""
