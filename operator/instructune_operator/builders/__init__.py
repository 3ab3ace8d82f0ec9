"""Pure builders: a tune and the operator settings in, Kubernetes manifests out."""
