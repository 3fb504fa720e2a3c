"""Public ops: argument checks and backend dispatch, one module per op family."""
