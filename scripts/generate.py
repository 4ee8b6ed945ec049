"""Generate the Python stubs in generated/ from proto/, or check that they have not drifted.

Usage: generate.py OUT_DIR          write stubs into OUT_DIR
       generate.py --check OUT_DIR  fail (exit 1) if OUT_DIR differs from freshly generated stubs

generated/ is also the API distribution (userservice-api): its packaging files and the
hand-written client live beside the stubs and are left out of the comparison.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# Imported by the contract (google.rpc.Status), never generated: googleapis-common-protos
# ships its Python module.
NOT_OURS = "google/"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(
        name
        for name in (p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
        if not name.startswith(NOT_OURS)
    )
    well_known = str(resources.files("grpc_tools") / "_proto")
    # The mypy-protobuf plugins live beside the interpreter, whatever PATH says.
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Packages, so that setuptools installs them and `import userservice.v1` works.
    for directory in {p.parent for p in out.rglob("*_pb2.py")}:
        while directory != out:
            (directory / "__init__.py").touch()
            (directory / "py.typed").touch()
            directory = directory.parent


# Paths under OUT_DIR that protoc does not write: packaging, the client, build by-products.
NOT_GENERATED = ("pyproject.toml", "README.md", "build", "dist", "userservice/client")


def _generated(path: str) -> bool:
    if path.endswith(".egg-info"):
        return False
    return not any(path == p or path.startswith(f"{p}/") for p in NOT_GENERATED)


def differences(left: Path, right: Path) -> list[str]:
    found: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        found.extend(
            f"{prefix}{n} (only in committed)" for n in cmp.left_only if _generated(prefix + n)
        )
        found.extend(f"{prefix}{n} (missing from committed)" for n in cmp.right_only)
        _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
        found.extend(f"{prefix}{n} (differs)" for n in mismatch + errors)
        for name, sub in cmp.subdirs.items():
            if _generated(prefix + name):
                walk(sub, f"{prefix}{name}/")

    ignore = ["__pycache__"]
    walk(filecmp.dircmp(str(left), str(right), ignore=ignore), "")
    return found


def main(argv: list[str]) -> int:
    check = "--check" in argv
    target = Path(next(a for a in argv if not a.startswith("--")))
    if not check:
        generate(target)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drift = differences(target, Path(tmp))
    if drift:
        print("generated/ is out of date with proto/; run `make generate`:", file=sys.stderr)
        for line in drift:
            print(f"  {line}", file=sys.stderr)
        return 1
    print("generated/ matches proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
