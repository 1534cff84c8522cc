"""Unpack the test suite of the installed transformers version into a directory (nothing of it is
kept in this repository).

    python .ci/fetch_transformers_tests.py TARGET

downloads the source distribution of exactly the installed version from PyPI
(``pip download --no-binary :all: --no-deps transformers==<installed>``) into a temporary
directory and extracts its ``tests/`` folder (only that) into ``TARGET``, replacing what was there.
``tests/hf_conformance`` runs transformers' common model tests from it when the environment
variable ``TPA_TRANSFORMERS_TESTS`` names ``TARGET``. The sdist ships the top-level test mixins
(``tests/test_modeling_common.py``, ``tests/test_configuration_common.py``, ...) but not the
``tests/generation/`` folder; the script says which of the files the conformance module reads
are present. Exit status 0 when the common model tests are there, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version

WANTED = ("test_modeling_common.py", "test_configuration_common.py", "generation/test_utils.py",
          "causal_lm_tester.py")


def extract_tests(archive: str, target: str, release: str) -> None:
    """Extract ``<top>/tests/**`` of the sdist ``archive`` of transformers ``release`` into ``target``
    (replaced as a whole), with a file ``TRANSFORMERS_VERSION`` saying which release they belong to."""
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tests-", dir=parent)
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if len(parts) < 3 or parts[1] != "tests" or not (member.isfile() or member.isdir()):
                    continue
                if ".." in parts or os.path.isabs(member.name):
                    raise ValueError(f"refusing a path outside the archive: {member.name}")
                member.name = "/".join(parts[2:])
                tar.extract(member, staging, filter="data")
        with open(os.path.join(staging, "TRANSFORMERS_VERSION"), "w") as f:
            f.write(release + "\n")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    target = argv[0]
    installed = version("transformers")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"transformers=={installed}", "-d", tmp], check=True)
        archives = [name for name in os.listdir(tmp) if name.endswith((".tar.gz", ".tgz"))]
        if len(archives) != 1:
            raise SystemExit(f"expected one transformers sdist in {tmp}, found {os.listdir(tmp)}")
        extract_tests(os.path.join(tmp, archives[0]), target, installed)
    present = {name: os.path.isfile(os.path.join(target, name)) for name in WANTED}
    print(f"transformers {installed} tests in {target}: " +
          ", ".join(f"{name} {'present' if ok else 'absent'}" for name, ok in present.items()))
    return 0 if present["test_modeling_common.py"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
