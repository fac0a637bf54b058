"""What a ranking service imports to read embeddings from the sidecar."""
