"""The request pipeline in plain Python: the worker, the model server, routing, loading, verdicts, control and the deploy config."""
