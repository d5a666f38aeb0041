"""Pure-torch compression engines: pruning, quantization, distillation and measurement.

Nothing here imports FastAPI, SQLAlchemy or Celery, so the engines can be driven from a notebook
or a test without a server. `worker.engines.pipeline.run_step` runs one step (a typed config) on a
model; `worker.runner.execute_job` runs a whole job spec and measures the result.
"""
