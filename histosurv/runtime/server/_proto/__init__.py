"""Generated gRPC messages and stubs; see proto/generate.py."""
