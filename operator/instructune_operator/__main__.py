"""`python -m instructune_operator`: runs the operator against the current kubeconfig."""

from __future__ import annotations

import kopf

from instructune_operator import handlers


def main() -> None:
    namespaces = handlers.SETTINGS.namespaces
    kopf.configure(verbose=False)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces)


if __name__ == "__main__":
    main()
