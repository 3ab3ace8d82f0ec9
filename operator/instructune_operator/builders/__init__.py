"""Pure builders: a tune and the operator settings in, Kubernetes manifests out."""

from instructune_operator.builders.desired import Observed, Tune, desired

__all__ = ["Observed", "Tune", "desired"]
