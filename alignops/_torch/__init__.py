"""The PyTorch engines: one module per kernel family with the launchers' signatures and math,
for every device the Triton kernels do not cover (CPU, MPS, float64, ...). Logits exist only
as bounded tiles (``_tiles.py``); no ``[N, V]`` tensor on any path."""
