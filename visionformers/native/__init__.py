"""Optional CPU kernels, attached to models from outside: C sources (``csrc/``), compiled on first use and cached
per machine (``build``). Models never import this package; without it they run plain PyTorch."""
