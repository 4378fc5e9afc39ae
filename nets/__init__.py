"""The networks below the study's modules: the small transformer and the LM loss."""
