"""How the stages are wired and run: params schema, atomic outputs, MLflow tracking, CLI."""
