"""The one error the package raises."""


class ClusterError(RuntimeError):
    """The cluster could not be built, started or used as asked."""
