"""The composition root and the `solaris` command: builds each deployment's parts from its
settings. The only package that imports both `solaris.server` and `solaris.precompute`."""
