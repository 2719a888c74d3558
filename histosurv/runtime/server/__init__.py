"""The gRPC server: KServe v2 inference (``inference.GRPCInferenceService``) and histosurv's slide
service, over the runtime's engines. Wire messages are generated from ``proto/`` into ``_proto``."""
