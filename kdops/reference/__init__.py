"""Plain-PyTorch implementation of every kdops op: the specification the kernels match."""
