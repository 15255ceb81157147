"""``python -m adapprox_kernels``: the diagnostics report."""

import argparse

from .diagnostics import report


def main() -> None:
    description = "Print versions, devices and which backends run here (and why not)."
    argparse.ArgumentParser(prog="python -m adapprox_kernels", description=description).parse_args()
    print(report())


if __name__ == "__main__":
    main()
