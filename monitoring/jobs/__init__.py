"""The batch jobs (drift, quality), their command line and their files.

They read the prediction log, feedback and the registry; they never import the serving path, the HTTP layer or bentoml.
"""
