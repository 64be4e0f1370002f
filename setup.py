"""Build step: compile the project's own .proto API with grpcio-tools.

Everything else lives in pyproject.toml. The generated modules go into the source tree
(``extproc/admin/v1/``, git-ignored) when this file is loaded, i.e. before setuptools
looks for packages, so regular and editable installs both ship them; the output depends
only on the grpcio-tools pinned in ``[build-system]``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted(PROTOS.rglob("*.proto")):
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    for module in (ROOT / "extproc").rglob("*_pb2.py"):
        package = module.parent
        while package != ROOT / "extproc":
            (package / "__init__.py").touch()
            package = package.parent


compile_protos()
setup()
