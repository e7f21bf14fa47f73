"""Builds and runs scripts/check_quantize_walk.cpp: the loop-free 8-bit code walk (scalar and
AVX-512 lanes) against quantize_value on every float within a block's absmax, for both maps.
An x86-64 machine with g++ (the lanes are checked where the CPU has AVX-512); about a minute.

  python -m scripts.check_quantize_walk
"""
import subprocess
import sys
import tempfile
from pathlib import Path

from torch.utils.cpp_extension import include_paths

from mixprec import quant

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        maps = Path(tmp) / "maps.h"
        lines = [f"static const float {name}[256] = {{{', '.join(repr(float(v)) + 'f' for v in m.tolist())}}};"
                 for name, m in (("kSignedMap", quant.signed_map()), ("kUnsignedMap", quant.unsigned_map()))]
        maps.write_text("\n".join(lines) + "\n")
        exe = Path(tmp) / "check"
        flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
        includes = [f"-I{p}" for p in [tmp, ROOT / "csrc" / "include", ROOT / "csrc" / "cpu", *include_paths()]]
        subprocess.run(["g++", *flags, *includes, str(ROOT / "scripts" / "check_quantize_walk.cpp"), "-o", str(exe)],
                       check=True)
        return subprocess.run([str(exe)], check=False).returncode  # its output says what differs


if __name__ == "__main__":
    sys.exit(main())
