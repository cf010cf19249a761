"""The software a GPU check ran with: Python, torch (+ CUDA device), and each named package's version.

    python scripts/env_report.py PACKAGE [PACKAGE ...]      (used by gpu_check.sh and gpu_check_verl.sh)
"""

import importlib
import platform
import sys


def main(packages: list[str]) -> None:
    print("python", sys.version.split()[0], platform.machine())
    try:
        import torch

        print("torch", torch.__version__, "cuda", torch.version.cuda,
              torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
    except Exception as err:  # noqa: BLE001 - a report: any import failure is printed
        print("torch: not importable:", err)
    for name in packages:
        try:
            mod = importlib.import_module(name)
            print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
        except Exception as err:  # noqa: BLE001 - a report: any import failure is printed
            print(f"{name}: not importable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])
