"""Triton kernels of kdops (imported lazily by kdops.backend), one module per op family.

Why ``torch.library.custom_op`` and not ``triton_op`` for the ``kdops_triton::`` ops: under
``TRITON_INTERPRET=1``, ``wrap_triton`` hands back the interpreted kernel untouched, so
``triton_op``'s functional decomposition (AOTAutograd: ``opcheck``'s aot_dispatch tests,
``torch.compile``) launches it on fake tensors and fails; and ``triton_op`` infers its schema
from annotations (``int`` becomes ``SymInt``, returns are unnamed) where these ops must share
the C++ ops' schemas.
"""
