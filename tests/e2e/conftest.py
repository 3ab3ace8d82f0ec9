"""End-to-end tests reuse the integration fixtures: the stack, the CRD, namespaces, the operator."""

from tests.integration.conftest import OperatorProcess, crd_installed, namespace, operator  # noqa: F401
