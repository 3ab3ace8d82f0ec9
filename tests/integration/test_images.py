"""The product's images as hack/build-images.sh builds them (buildah, no Docker daemon).

What is checked is what a cluster gets: the OCI archives the script hands to containerd (their
configuration and every layer); and the images run: the job image with buildah as KubeRay starts
it (`bash -lc`, uid 1000), the operator image with runc on a read-only root file system as uid
65532. The first run builds the images (the job image is ~6 GB: many minutes cold); later runs
find them cached outside the clone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "build-images.sh"
CACHE = Path(os.environ.get("INSTRUCTUNE_CACHE", Path.home() / ".cache" / "instructune"))
IMAGES = CACHE / "images"
SITE = "opt/venv/lib/python3.11/site-packages/"
BUNDLE = "etc/ssl/certs/ca-certificates.crt"
MACHINE_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass
class Image:
    ref: str
    archive: Path
    config: dict[str, Any]
    # Final file system: path (no leading /) -> (layer blob, TarInfo), whiteouts applied.
    files: dict[str, tuple[str, tarfile.TarInfo]] = field(repr=False)
    # Every regular file of every layer: what a layer carries even where a later one deletes it.
    layer_files: list[tuple[str, tarfile.TarInfo]] = field(repr=False)

    def exists(self, path: str) -> bool:
        return path in self.files

    def info(self, path: str) -> tarfile.TarInfo:
        return self.files[path][1]

    def read(self, path: str, _hops: int = 0) -> bytes:
        """The bytes of `path` (symbolic links followed inside the image)."""
        layer, member = self.files[path]
        if member.issym() and _hops < 8:
            target = (
                member.linkname
                if member.linkname.startswith("/")
                else os.path.join(os.path.dirname(path), member.linkname)
            )
            return self.read(os.path.normpath(target).lstrip("/"), _hops + 1)
        return self.read_member(layer, member)

    def read_member(self, layer: str, member: tarfile.TarInfo) -> bytes:
        with tarfile.open(self.archive) as outer:
            blob = outer.extractfile(layer)
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r:") as inner:
                data = inner.extractfile(member)
                assert data is not None, member.name
                return data.read()

    def site_packages(self) -> set[str]:
        return {p[len(SITE) :].split("/")[0] for p in self.files if p.startswith(SITE)}


def _json_member(outer: tarfile.TarFile, name: str) -> dict[str, Any]:
    member = outer.extractfile(name)
    assert member is not None, name
    return json.loads(member.read())


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def load_archive(ref: str, archive: Path) -> Image:
    """Reads an OCI archive: its index must name `ref`; layers are applied in order (whiteouts too)."""
    with tarfile.open(archive) as outer:
        (desc,) = _json_member(outer, "index.json")["manifests"]
        assert desc["annotations"]["org.opencontainers.image.ref.name"] == ref
        manifest = _json_member(outer, _blob_name(desc["digest"]))
        config = _json_member(outer, _blob_name(manifest["config"]["digest"]))
        files: dict[str, tuple[str, tarfile.TarInfo]] = {}
        layer_files: list[tuple[str, tarfile.TarInfo]] = []
        for layer in manifest["layers"]:
            assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar", layer
            blob_name = _blob_name(layer["digest"])
            blob = outer.extractfile(blob_name)
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r:") as inner:
                for member in inner:
                    path = member.name.removeprefix("./").rstrip("/")
                    base, parent = os.path.basename(path), os.path.dirname(path)
                    if base == ".wh..wh..opq":
                        for p in [p for p in files if p.startswith(parent + "/")]:
                            del files[p]
                    elif base.startswith(".wh."):
                        gone = os.path.join(parent, base[4:])
                        for p in [p for p in files if p == gone or p.startswith(gone + "/")]:
                            del files[p]
                    elif path and path != ".":
                        files[path] = (blob_name, member)
                        if member.isfile():
                            layer_files.append((blob_name, member))
    return Image(ref, archive, config, files, layer_files)


def run_build(*names: str) -> list[tuple[str, Path]]:
    """hack/build-images.sh NAMES: its stdout is exactly one `REF ARCHIVE` line per name."""
    res = subprocess.run(
        ["bash", str(SCRIPT), *names], capture_output=True, text=True, check=False, timeout=5400
    )
    assert res.returncode == 0, f"hack/build-images.sh {' '.join(names)} failed:\n{res.stderr[-4000:]}"
    lines = [line.split() for line in res.stdout.splitlines()]
    assert len(lines) == len(names) and all(len(words) == 2 for words in lines), res.stdout
    return [(ref, Path(path)) for ref, path in lines]


@pytest.fixture(scope="session")
def built() -> dict[str, Image]:
    """The base, operator and job images (built once; cached outside the clone)."""
    names = ("base", "operator", "job")
    images = {}
    for name, (ref, archive) in zip(names, run_build(*names), strict=True):
        assert archive.is_file() and archive.is_relative_to(IMAGES), archive
        images[name] = load_archive(ref, archive)
    return images


def buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """buildah on the image store of hack/build-images.sh."""
    env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(IMAGES / "storage.conf"), TMPDIR=str(IMAGES / "tmp"))
    return subprocess.run(
        ["buildah", *args], capture_output=True, text=True, env=env, check=False, timeout=timeout
    )


@pytest.fixture
def container() -> Iterator[Callable[[Image], tuple[str, Path]]]:
    """container(image) -> (name, root file system): a working container, removed afterwards."""
    made: list[str] = []

    def make(image: Image) -> tuple[str, Path]:
        if buildah("inspect", "--type", "image", image.ref).returncode != 0:
            pulled = buildah("pull", f"oci-archive:{image.archive}")
            assert pulled.returncode == 0, pulled.stderr
        name = f"itest-{uuid.uuid4().hex[:8]}"
        res = buildah("from", "--pull=false", "--name", name, image.ref)
        assert res.returncode == 0, res.stderr
        made.append(name)
        mount = buildah("mount", name)
        assert mount.returncode == 0, mount.stderr
        return name, Path(mount.stdout.strip())

    yield make
    for name in made:
        buildah("rm", name)


def pem_blocks(text: str) -> set[str]:
    blocks: set[str] = set()
    current: list[str] = []
    for line in text.splitlines():
        if "BEGIN CERTIFICATE" in line:
            current = [line]
        elif current:
            current.append(line)
            if "END CERTIFICATE" in line:
                blocks.add("\n".join(current))
                current = []
    return blocks


def machine_files() -> list[Path]:
    """The building machine's pip configuration and CA bundle: what the build mounted."""
    candidates = [MACHINE_BUNDLE, Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf")]
    candidates += [
        Path.home() / ".config/pip/pip.conf",
        Path.home() / ".pip/pip.conf",
        IMAGES / "tmp" / "pip.conf",
    ]
    return [p for p in candidates if p.is_file() and p.stat().st_size > 0]


# Neither image carries the building machine's pip configuration or certificate authorities.


@pytest.mark.parametrize("name", ["operator", "job"])
def test_no_machine_pip_configuration_or_ca_in_the_image(built: dict[str, Image], name: str) -> None:
    image, base = built[name], built["base"]
    env = image.config["config"].get("Env", [])
    assert not [e for e in env if e.upper().startswith(("PIP_", "REQUESTS_CA_BUNDLE", "SSL_CERT"))], env
    # No pip configuration in any layer, not even one a later layer deletes.
    assert [m.name for _, m in image.layer_files if os.path.basename(m.name) in ("pip.conf", "pip.ini")] == []
    # The CA bundle is the base's own; no layer holds a copy of a machine file the build mounted.
    assert image.read(BUNDLE) == base.read(BUNDLE)
    for machine_file in machine_files():
        data = machine_file.read_bytes()
        copies = [
            m.name
            for layer, m in image.layer_files
            if m.size == len(data) and image.read_member(layer, m) == data
        ]
        assert copies == [], f"{machine_file} is in {image.ref} as {copies}"
    if MACHINE_BUNDLE.is_file():
        extra = pem_blocks(MACHINE_BUNDLE.read_text(errors="replace")) - pem_blocks(
            base.read(BUNDLE).decode()
        )
        assert not extra & pem_blocks(image.read(BUNDLE).decode())
    # Nothing the build mounted stays behind: secrets, pip's cache, the wheelhouse, the context.
    for prefix in ("run/secrets/", "root/.cache/pip/", "var/cache/instructune-wheels/", "tmp/context/"):
        assert not [p for p in image.files if p.startswith(prefix)], prefix


# The operator image


def test_operator_image_configuration(built: dict[str, Image]) -> None:
    image = built["operator"]
    cfg = image.config["config"]
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["python", "-m", "instructune_operator"]
    assert "PYTHONDONTWRITEBYTECODE=1" in cfg["Env"]
    assert cfg["Labels"]["org.opencontainers.image.version"] == image.ref.rsplit(":", 1)[1]
    packages = image.site_packages()
    assert {"instructune_operator", "kopf", "pydantic", "httpx", "boto3"} <= packages
    assert not {"torch", "ray", "transformers", "peft", "deepspeed", "pip", "setuptools"} & packages, packages
    # Of the job package, the contract (the config the operator builds, the exit codes), not the training code.
    jobs = sorted(
        os.path.basename(p)
        for p in image.files
        if p.startswith(SITE + "instructune_jobs/") and p.endswith(".py")
    )
    assert jobs == ["__init__.py", "config.py", "contract.py"]


def run_runc(bundle: Path, rootfs: Path, cfg: dict[str, Any], args: list[str]) -> tuple[int, str]:
    """Runs args in rootfs with runc, root file system read-only, as the image's user with its
    environment: (exit status, stdout and stderr)."""
    bundle.mkdir(parents=True, exist_ok=True)
    spec = subprocess.run(
        ["runc", "spec", "--bundle", str(bundle)], capture_output=True, text=True, check=False
    )
    assert spec.returncode == 0, spec.stderr
    config = json.loads((bundle / "config.json").read_text())
    uid, gid = (int(x) for x in cfg["User"].split(":"))
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"].update(
        terminal=False,
        args=args,
        env=cfg["Env"],
        cwd=cfg.get("WorkingDir") or "/",
        user={"uid": uid, "gid": gid},
    )
    (bundle / "config.json").write_text(json.dumps(config))
    name = f"itest-{uuid.uuid4().hex[:8]}"
    state = bundle / "state"
    try:
        res = subprocess.run(
            ["runc", "--root", str(state), "run", "--bundle", str(bundle), name],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
    finally:
        subprocess.run(
            ["runc", "--root", str(state), "delete", "--force", name], capture_output=True, check=False
        )
    return res.returncode, res.stdout + res.stderr


def test_operator_image_runs_as_65532_on_a_read_only_root(
    built: dict[str, Image], container: Callable[[Image], tuple[str, Path]], tmp_path: Path
) -> None:
    """The operator's modules import (bytecode precompiled, nothing written) and the root file
    system refuses writes, as the image's user."""
    assert shutil.which("runc"), "runc comes with buildah (hack/build-images.sh installs it)"
    image = built["operator"]
    _, rootfs = container(image)
    script = (
        "import os, sys, importlib.util\n"
        "import instructune_operator.handlers, instructune_operator.__main__, instructune_jobs.config, kopf\n"
        "assert (os.getuid(), os.getgid()) == (65532, 65532), (os.getuid(), os.getgid())\n"
        "assert importlib.util.find_spec('torch') is None and importlib.util.find_spec('ray') is None\n"
        "for path in ('/opt/venv/probe', '/probe', '/etc/probe'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError as e:\n"
        "        assert e.errno == 30, (path, e)  # EROFS\n"
        "    else:\n"
        "        sys.exit(f'{path} was writable')\n"
        "print('operator-image-ok')\n"
    )
    cfg = image.config["config"]
    rc, out = run_runc(tmp_path / "check", rootfs, cfg, ["python", "-c", script])
    assert (rc, out.strip().splitlines()[-1:]) == (0, ["operator-image-ok"]), out[-3000:]
    # The entrypoint itself: Kopf starts and stops only for want of credentials (no cluster here).
    rc, out = run_runc(tmp_path / "entrypoint", rootfs, cfg, [*cfg["Entrypoint"], *(cfg.get("Cmd") or [])])
    assert rc != 0 and "Ran out of valid credentials" in out, out[-3000:]
    assert "Read-only file system" not in out and "ModuleNotFoundError" not in out, out[-3000:]


# The job image


def test_job_image_configuration(built: dict[str, Image]) -> None:
    image = built["job"]
    cfg = image.config["config"]
    assert cfg["User"] == "1000:100"  # the rayproject images' `ray` user; the operator runs Ray pods as 1000
    assert cfg["WorkingDir"] == "/home/ray"
    assert any(e.startswith("PATH=/opt/venv/bin:") for e in cfg["Env"])
    assert cfg["Labels"]["org.opencontainers.image.version"] == image.ref.rsplit(":", 1)[1]
    packages = image.site_packages()
    assert {"instructune_jobs", "torch", "ray", "deepspeed", "peft", "transformers", "boto3"} <= packages
    assert "instructune_operator" not in packages
    home = image.info("home/ray")
    assert home.isdir() and (home.uid, home.gid) == (1000, 100)
    passwd = image.read("etc/passwd").decode().splitlines()
    assert "ray:x:1000:100::/home/ray:/bin/bash" in passwd
    # KubeRay: bash (its commands), wget and grep (its exec probes), ray; DeepSpeed's CPU ops: g++.
    for tool in ("usr/bin/bash", "usr/bin/wget", "usr/bin/grep", "opt/venv/bin/ray", "usr/bin/g++"):
        assert image.exists(tool) or image.exists(tool.replace("usr/bin/", "bin/")), tool


def test_job_image_runs_the_training_stack(
    built: dict[str, Image], container: Callable[[Image], tuple[str, Path]]
) -> None:
    """As KubeRay runs it (`/bin/bash -lc`: a login shell, whose /etc/profile resets PATH), as uid
    1000: `ray` on PATH and the pinned training stack importable."""
    image = built["job"]
    name, _ = container(image)
    script = (
        "set -e; command -v ray; ray --version; wget --version | head -1; "
        "python -c 'import os, instructune_jobs.finetune, torch, ray, deepspeed, peft, transformers, boto3; "
        "import importlib.metadata as m; "
        'print(os.getuid(), os.environ["HOME"], torch.__version__, ray.__version__, m.version("instructune"))\''
    )
    res = buildah("run", "--user", "1000:100", name, "--", "/bin/bash", "-lc", script)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout.strip().splitlines()
    assert out[0] == "/opt/venv/bin/ray", out
    uid, home, _torch, ray_version, version = out[-1].split()
    assert (uid, home, ray_version) == ("1000", "/home/ray", "2.60.0"), out[-1]
    assert image.ref.endswith(":" + version)
