"""Everything ASGI and BentoML: the edge middleware, the BentoML workarounds, the handlers and the response models."""
