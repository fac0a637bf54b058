"""The precompute daemon: speculates which pairs will be scored and runs the model for them."""
