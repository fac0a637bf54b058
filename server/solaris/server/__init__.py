"""The solaris sidecar: serves precomputed embeddings over gRPC from a bounded store."""
