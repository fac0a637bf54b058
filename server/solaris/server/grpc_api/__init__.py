"""The gRPC face of the sidecar: servicer, converters and error mapping."""
