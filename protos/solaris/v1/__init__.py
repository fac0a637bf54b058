"""Generated bindings for the solaris.v1 contract (embedding_store.proto); never hand-edited."""
