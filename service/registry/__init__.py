"""The model registry: reading and verifying versions (:mod:`.store`) apart from registering them (:mod:`.register`)."""
