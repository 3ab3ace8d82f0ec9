"""The image build's pure parts (hack/images.py) and the names the project gives its images.

The images themselves are built and inspected in tests/integration/test_images.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
import images  # noqa: E402

from instructune_operator.settings import Settings  # noqa: E402

pytestmark = pytest.mark.unit
REPOSITORY = "ghcr.io/instructune"


def test_image_names_carry_the_package_version() -> None:
    version = images.project_version()
    chart = yaml.safe_load((ROOT / "charts/instructune/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/instructune/values.yaml").read_text())
    assert chart["appVersion"] == version  # the operator image's tag (values image.tag defaults to it)
    assert values["image"]["repository"] == f"{REPOSITORY}/instructune-operator"
    assert values["image"]["tag"] == ""
    assert Settings().ray_image == values["settings"]["rayImage"] == f"{REPOSITORY}/instructune-job:{version}"
    script = (ROOT / "hack/build-images.sh").read_text()
    assert f"REPO=${{INSTRUCTUNE_IMAGE_REPOSITORY:-{REPOSITORY}}}" in script
    for dockerfile in ("operator/Dockerfile", "jobs/Dockerfile"):
        assert f"ARG VERSION={version}\n" in (ROOT / dockerfile).read_text(), dockerfile


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "jobs/Dockerfile"])
def test_dockerfiles_take_the_machine_configuration_only_as_build_secrets(dockerfile: str) -> None:
    """A public base by default; pip's configuration and CA only as secret mounts of RUN steps;
    nothing of the build machine is COPY'd or set as an ENV/ARG."""
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, re.M)
    assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf" in text
    assert "--mount=type=secret,id=ca.crt,target=/run/secrets/ca.crt" in text
    instructions = re.findall(r"^(COPY|ADD|ENV|ARG)\b(.*(?:\\\n.*)*)", text, re.M)
    for kind, rest in instructions:
        assert not re.search(r"pip\.conf|ca-certificates|\.crt|PIP_|/opt/wheels", rest), (kind, rest)
    assert "--require-hashes" in text and "requirements.lock" in text


def test_dockerignore_keeps_the_context_to_what_the_dockerfiles_use() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    for dockerfile in ("operator/Dockerfile", "jobs/Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        for source in re.findall(r"source=([^,\s]+)", text) + re.findall(
            r"^COPY (?!--from)(.+) \S+$", text, re.M
        ):
            for path in source.split():
                if path != ".":
                    assert any(path == a or path.startswith(a + "/") for a in allowed), (dockerfile, path)


def test_pip_config_listing_becomes_one_build_configuration(tmp_path: Path) -> None:
    finds = tmp_path / "wheels"
    finds.mkdir()
    (finds / "x-1-py3-none-any.whl").write_bytes(b"")
    listing = "\n".join(
        [
            "global.cert='/etc/ssl/certs/ca-certificates.crt'",
            "global.index-url='https://index.example/simple'",
            ":env:.default-timeout='180'",
            ":env:.find-links='/nonexistent/wheels'",
            f"install.find-links='{finds}'",
            "global.client-cert='/root/client.pem'",
        ]
    )
    sections = images.parse_pip_config_list(listing)
    assert sections["global"]["default-timeout"] == "180"
    text, bundle, mounts = images.build_pip_conf(sections, "/run/secrets/ca.crt")
    assert bundle == "/etc/ssl/certs/ca-certificates.crt"
    assert mounts == [str(finds)]
    assert text == (
        "[global]\n"
        "cert = /run/secrets/ca.crt\n"
        "default-timeout = 180\n"
        "index-url = https://index.example/simple\n"
        "\n"
        "[install]\n"
        f"find-links = {finds}\n"
    )


def test_debian_mirror_from_either_apt_sources_format(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://old.example/debian bookworm main\ndeb [arch=amd64] http://other.example/debian bookworm main\n"
    )
    assert images.debian_mirror([deb822]) == "http://mirror.example/debian"
    assert images.debian_mirror([one_line, deb822]) == "http://other.example/debian"
    assert images.debian_mirror([tmp_path / "missing.list"]) is None


def test_tree_key_follows_content_and_names_not_bytecode(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    key = images.tree_key([tmp_path / "pkg"], tmp_path)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"x")
    assert images.tree_key([tmp_path / "pkg"], tmp_path) == key
    (tmp_path / "pkg" / "a.py").write_text("a = 2\n")
    assert images.tree_key([tmp_path / "pkg"], tmp_path) != key


def _docker_archive(path: Path, ref: str, layers: list[bytes], corrupt: bool = False) -> str:
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [d.removeprefix("sha256:") + ".tar" for d in diff_ids]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": names}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in [
            (config_name, config),
            ("manifest.json", manifest),
            *zip(names, layers, strict=True),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data[:-1] + b"!" if corrupt and name in names else data))
    return config_name


def _layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_docker_archive_becomes_an_oci_archive_that_names_its_image(tmp_path: Path) -> None:
    ref = "ghcr.io/instructune/instructune-job:0.1.0"
    layers = [_layer({"etc/os-release": b"bookworm\n"}), _layer({"opt/venv/bin/ray": b"#!ray\n"})]
    config_name = _docker_archive(tmp_path / "docker.tar", ref, layers)
    digest = images.docker_to_oci_archive(tmp_path / "docker.tar", tmp_path / "oci.tar", ref)
    with tarfile.open(tmp_path / "oci.tar") as tar:

        def blob(d: str) -> bytes:
            f = tar.extractfile("blobs/sha256/" + d.removeprefix("sha256:"))
            assert f is not None
            return f.read()

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[union-attr]
        (desc,) = index["manifests"]
        assert desc["digest"] == digest
        assert desc["annotations"] == {
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": ref,
        }
        manifest_bytes = blob(digest)
        assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == digest
        manifest = json.loads(manifest_bytes)
        assert manifest["config"]["digest"] == "sha256:" + config_name.removesuffix(".json")
        assert [layer["mediaType"] for layer in manifest["layers"]] == [
            "application/vnd.oci.image.layer.v1.tar"
        ] * 2
        assert [blob(layer["digest"]) for layer in manifest["layers"]] == layers


def test_a_layer_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    _docker_archive(tmp_path / "docker.tar", "x:1", [_layer({"a": b"a"})], corrupt=True)
    with pytest.raises(ValueError, match="does not match its digest"):
        images.docker_to_oci_archive(tmp_path / "docker.tar", tmp_path / "oci.tar", "x:1")


def test_the_docker_archive_may_come_through_a_pipe(tmp_path: Path) -> None:
    """hack/build-images.sh has buildah write into a FIFO that the rewrite reads in one pass."""
    ref = "ghcr.io/instructune/instructune-operator:0.1.0"
    layers = [_layer({"etc/os-release": b"bookworm\n"})]
    _docker_archive(tmp_path / "docker.tar", ref, layers)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes((tmp_path / "docker.tar").read_bytes()))
    writer.start()
    digest = images.docker_to_oci_archive(fifo, tmp_path / "oci.tar", ref)
    writer.join(timeout=10)
    assert digest == images.docker_to_oci_archive(tmp_path / "docker.tar", tmp_path / "again.tar", ref)


def test_the_job_environment_key_covers_its_stage_not_the_stages_after_it() -> None:
    dockerfile = (ROOT / "jobs" / "Dockerfile").read_text()
    stage = images.stage_text(dockerfile, "environment")
    assert "FROM ${BASE} AS environment" in stage and "pip install" in stage
    assert "FROM ${ENVIRONMENT}" not in stage and "ShareMemCommBuilder" not in stage
    edited = dockerfile.replace("PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=1 EXTRA=1")
    assert edited != dockerfile and images.stage_text(edited, "environment") == stage
    with pytest.raises(SystemExit):
        images.stage_text(dockerfile, "no-such-stage")
