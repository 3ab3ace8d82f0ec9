"""Helpers of hack/build-images.sh: cache keys, the build's pip configuration, the Debian mirror.

Standard library only: it runs before any environment exists.

  images.py key PATH...            a 16-hex key of the files' relative paths and contents
                                   (directories walked, __pycache__ and *.pyc skipped)
  images.py pip-conf OUT CERT      writes the machine's pip configuration (`pip config list`,
                                   files and PIP_* variables) as one pip.conf whose `cert` is CERT,
                                   the path the build mounts the machine's CA bundle at; prints the
                                   CA bundle to mount (empty when none) and, one per line after it,
                                   local directories the configuration names (find-links)
  images.py mirror                 the Debian mirror of the machine's apt sources
  images.py version                the project's version (pyproject.toml)
  images.py oci-archive SRC OUT REF
                                   rewrites a docker-archive (what `buildah push` writes with
                                   uncompressed layers; SRC may be a pipe) as an OCI archive
                                   named REF
                                   (`ctr images import` reads both; the OCI index names the
                                   manifest digest, so an importer can tell it holds the image)
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Keys whose value is a path on the building machine, not meaningful inside a build.
CERT_KEYS = {"cert"}
PATH_LIST_KEYS = {"find-links"}
# Never carried into a build: they name the machine's own files or change pip's behaviour there.
DROPPED_KEYS = {"client-cert", "log", "cache-dir", "no-cache-dir", "target", "prefix", "root", "user"}


def tree_key(paths: list[Path], root: Path = ROOT) -> str:
    """Hash of each file's path relative to root and its bytes, in sorted order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += [
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(path)
    digest = hashlib.sha256()
    for file in sorted(set(files)):
        rel = file.resolve().relative_to(root.resolve()) if file.is_absolute() else file
        digest.update(str(rel).encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def parse_pip_config_list(listing: str) -> dict[str, dict[str, str]]:
    """`pip config list` lines (`global.cert='...'`, `:env:.default-timeout='180'`) -> sections.

    Environment variables (PIP_*) are pip's `:env:` variant and apply to every command: they go to
    [global]. A later line overrides an earlier one, as pip's own precedence lists env last.
    """
    sections: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        match = re.match(r"^(:env:|[A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)=(.*)$", line.strip())
        if not match:
            continue
        section, key, raw = match.groups()
        section = "global" if section == ":env:" else section
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        sections.setdefault(section, {})[key.replace("_", "-")] = str(value)
    return sections


def build_pip_conf(
    sections: dict[str, dict[str, str]], cert_target: str
) -> tuple[str, str | None, list[str]]:
    """(pip.conf text for the build, the machine's CA bundle or None, local directories to mount)."""
    ca_bundle: str | None = None
    mounts: list[str] = []
    lines: list[str] = []
    for section in sorted(sections):
        body: list[str] = []
        for key, value in sorted(sections[section].items()):
            if key in DROPPED_KEYS:
                continue
            if key in CERT_KEYS:
                ca_bundle = value
                value = cert_target
            elif key in PATH_LIST_KEYS:
                kept = []
                for item in value.split():
                    if "://" in item:
                        kept.append(item)
                    elif os.path.isdir(item) and any(os.scandir(item)):
                        kept.append(item)
                        mounts.append(item)
                if not kept:
                    continue
                value = " ".join(kept)
            body.append(f"{key} = {value}")
        if body:
            lines += [f"[{section}]", *body, ""]
    return "\n".join(lines), ca_bundle, mounts


def debian_mirror(sources: list[Path]) -> str | None:
    """The first Debian archive (not -security) of the apt sources, one-line or deb822 format."""
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, v in (
                        line.split(":", 1)
                        for line in stanza.splitlines()
                        if ":" in line and not line.startswith(("#", " "))
                    )
                )
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", ""):
                    continue
                for uri in fields.get("uris", "").split():
                    if "security" not in uri:
                        return uri
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                    return parts[1]
    return None


class _HashingReader:
    """Reads through `raw`, hashing what passes (all tarfile.addfile asks of a file)."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        return data


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def docker_to_oci_archive(src: Path, out: Path, ref: str) -> str:
    """Streams the docker-archive `src` (a file, or a pipe `buildah push` writes into) into the
    OCI archive `out`: one sequential pass, layers uncompressed under their own digests, each
    verified on the way. Returns the manifest digest."""
    blob_name = re.compile(r"^(?:\./)?([0-9a-f]{64})\.(tar|json)$")
    seen: dict[str, int] = {}  # layer digest -> size
    small: dict[str, bytes] = {}  # config blobs and manifest.json
    with tarfile.open(src, "r|") as dock, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as oci:
        oci.copybufsize = 1 << 20
        _add_bytes(oci, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        for member in dock:
            if not member.isfile():
                continue  # the legacy per-layer directories: symbolic links and small files
            match = blob_name.match(member.name)
            data = dock.extractfile(member)
            assert data is not None
            if match and match.group(2) == "tar":
                digest = match.group(1)
                reader = _HashingReader(data)  # type: ignore[arg-type]
                info = tarfile.TarInfo(f"blobs/sha256/{digest}")
                info.size, info.mode = member.size, 0o644
                oci.addfile(info, reader)  # type: ignore[arg-type]
                if reader.sha.hexdigest() != digest:
                    raise ValueError(f"{src}: layer {member.name} does not match its digest")
                seen[digest] = member.size
            elif match or member.name.removeprefix("./") == "manifest.json":
                small[member.name.removeprefix("./")] = data.read()
        (entry,) = json.loads(small["manifest.json"])
        config = small[entry["Config"]]
        config_digest = hashlib.sha256(config).hexdigest()
        _add_bytes(oci, f"blobs/sha256/{config_digest}", config)
        layers = []
        for name in entry["Layers"]:
            digest = os.path.basename(name).removesuffix(".tar")
            if digest not in seen:
                raise ValueError(f"{src}: layer {name} is not in the archive")
            layers.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{digest}",
                    "size": seen[digest],
                }
            )
        manifest = _canonical(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": f"sha256:{config_digest}",
                    "size": len(config),
                },
                "layers": layers,
            }
        )
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        _add_bytes(oci, f"blobs/sha256/{manifest_digest.removeprefix('sha256:')}", manifest)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref,
                    },
                }
            ],
        }
        _add_bytes(oci, "index.json", _canonical(index))
    return manifest_digest


def stage_text(dockerfile: str, stage: str) -> str:
    """The Dockerfile up to the end of stage `stage` (its global ARGs, earlier stages and itself):
    what that stage's image depends on, so an edit of a later stage does not rebuild it."""
    lines = dockerfile.splitlines(keepends=True)
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if re.match(rf"(?i)^FROM\s+\S+\s+AS\s+{re.escape(stage)}\s*$", line)
        ),
        None,
    )
    if start is None:
        raise SystemExit(f"images.py: no stage {stage!r}")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"(?i)^FROM\s", lines[i])), len(lines))
    return "".join(lines[:end])


def project_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
    if not match:
        raise SystemExit("images.py: no version in pyproject.toml")
    return match.group(1)


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "key":
        print(tree_key([Path(a) for a in args], Path.cwd()))
    elif command == "stage":
        sys.stdout.write(stage_text(Path(args[0]).read_text(), args[1]))
    elif command == "pip-conf":
        out, cert_target = args
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
        ).stdout
        sections = parse_pip_config_list(listing)
        system_bundle = "/etc/ssl/certs/ca-certificates.crt"
        if "cert" not in sections.get("global", {}) and os.path.exists(system_bundle):
            # No `cert` configured: pip inside the build trusts the machine's system bundle too.
            sections.setdefault("global", {})["cert"] = system_bundle
        text, ca_bundle, mounts = build_pip_conf(sections, cert_target)
        Path(out).write_text(text)
        print(ca_bundle or "")
        for mount in mounts:
            print(mount)
    elif command == "mirror":
        apt = Path("/etc/apt")
        sources = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
        sources += sorted((apt / "sources.list.d").glob("*.sources"))
        mirror = debian_mirror(sources)
        if not mirror:
            return 1
        print(mirror)
    elif command == "version":
        print(project_version())
    elif command == "oci-archive":
        src, out, ref = args
        print(docker_to_oci_archive(Path(src), Path(out), ref))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
