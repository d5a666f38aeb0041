"""Pure-torch compression engines: pruning, quantization, distillation and measurement.

Nothing here imports FastAPI, SQLAlchemy or Celery, so the engines can be driven from a notebook
or a test without a server. The public entry point is `worker.engines.pipeline.run_pipeline`.
"""
