"""`python -m instructune_operator`: runs the operator against the current kubeconfig."""

from __future__ import annotations

import sys

# The operator reaches the API server through Kopf and httpx only. Where the `kubernetes` package
# happens to be installed (a development environment), Kopf would import it for isinstance checks
# of its models: ~55 MB of resident memory the operator never uses.
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

import kopf  # noqa: E402

from instructune_operator import handlers  # noqa: E402


def main() -> None:
    namespaces = handlers.SETTINGS.namespaces
    kopf.configure(verbose=False)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces)


if __name__ == "__main__":
    main()
